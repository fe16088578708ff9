"""Published image networks by name: `--model torchvision:resnet18`, `--model timm:convnext_nano`.

The architecture is built from torchvision or timm and wrapped in the interface every layerwise model has
(`forward_features`, `forward_head`, `named_stages`), so explanations, probes, shift detection and transfer
work on it. The published weights are fetched once, by the library's own download code into its own cache
(torch hub's `checkpoints/` folder; the Hugging Face cache for timm), and only when `fit` starts a new run:
a saved run holds its own weights and loads offline. Weight files are read without executing code
(`torch.load(weights_only=True)`, safetensors).
"""

from __future__ import annotations

import difflib
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from layerwise.errors import InputError

SOURCES = ("torchvision", "timm")
# Published networks downsample 32x; small images (Fashion-MNIST's 28 px) are scaled up to this side first,
# nearer the scale their features were learned at.
MIN_SIDE = 64
FINE_TUNE_LR = 1e-3  # AdamW peak rate for fine-tuning a published network (the head learns first, see --init)
REACH_TIMEOUT_S = 5.0


def split_name(name: str) -> tuple[str, str]:
    source, _, arch = name.partition(":")
    if source not in SOURCES or not arch:
        raise InputError(f"--model {name}: published models are named torchvision:ARCH or timm:ARCH")
    return source, arch


def check_architecture(name: str) -> None:
    """A one-line error, with close names, for an architecture the library does not have."""
    source, arch = split_name(name)
    known = torchvision_architectures() if source == "torchvision" else timm_architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(f'{source}:{c}' for c in close)}" if close else ""
        raise InputError(f"--model {name}: {source} has no image classifier called {arch!r}{hint}")


def torchvision_architectures() -> list[str]:
    import torchvision

    return [n for n in torchvision.models.list_models(module=torchvision.models) if supported_torchvision(n)]


def supported_torchvision(arch: str) -> bool:
    # Two layouts cover most of torchvision's classifiers: ResNet-style (conv1 ... layer4, fc) and
    # features + avgpool + classifier (VGG, MobileNet, EfficientNet, ConvNeXt, RegNet-less ones).
    return arch.startswith(("resnet", "resnext", "wide_resnet", "mobilenet", "efficientnet", "convnext", "vgg"))


def timm_architectures() -> list[str]:
    import timm

    return timm.list_models()


class HubClassifier(nn.Module):
    """A torchvision or timm classifier behind layerwise's model interface."""

    def __init__(self, body: nn.Module, source: str, stages: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.body, self.source = body, source
        first = (
            body.classifier[0] if hasattr(body, "classifier") and isinstance(body.classifier, nn.Sequential) else None
        )
        self.classifier_takes_maps = first is not None and type(first).__name__ == "LayerNorm2d"  # ConvNeXt
        self._stages = stages  # modules of `body`, listed (not registered twice)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return list(self._stages)

    def token_grid(self, image_size: tuple[int, int]) -> tuple[int, int, int] | None:
        """A vision transformer's layout of its stage outputs for an input of `image_size` (H, W): (tokens
        before the patches, patch rows, patch columns); None for networks whose stages are feature maps."""
        patch_embed = getattr(self.body, "patch_embed", None)
        # num_prefix_tokens marks timm's plain transformers (ViT, DeiT, EVA, BEiT); Swin also embeds patches,
        # but its stages are feature maps, which Grad-CAM reads directly.
        if self.source != "timm" or not hasattr(patch_embed, "dynamic_feat_size"):
            return None
        if not hasattr(self.body, "num_prefix_tokens"):
            return None
        scale = max(1.0, MIN_SIDE / min(image_size))  # what forward_features feeds the body
        rows, cols = patch_embed.dynamic_feat_size(tuple(math.floor(side * scale) for side in image_size))
        return self.body.num_prefix_tokens, rows, cols

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < MIN_SIDE:
            scale = MIN_SIDE / min(x.shape[-2:])
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        if self.source == "timm":
            return self.body.forward_features(x)
        for _, stage in self._stages:
            x = stage(x)
        return x

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.source == "timm":
            return self.body.forward_head(features, pre_logits=pre_logits)
        if pre_logits:
            return torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        if hasattr(self.body, "fc"):  # ResNet layout
            return self.body.fc(torch.flatten(self.body.avgpool(features), 1))
        # torchvision's own order: its pooling (VGG's keeps 7x7), then flattened, except for ConvNeXt, whose
        # classifier starts with a LayerNorm2d over the pooled map and flattens itself.
        pooled = self.body.avgpool(features)
        if not self.classifier_takes_maps:
            pooled = torch.flatten(pooled, 1)
        return self.body.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_hub_model(name: str, in_channels: int, num_classes: int) -> HubClassifier:
    """The architecture with fresh weights (`HubWeights` copies the published ones in)."""
    check_architecture(name)
    source, arch = split_name(name)
    if source == "timm":
        import timm

        options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
        try:  # vision transformers are built for one image size; these two options let them take any
            body = timm.create_model(arch, **options, dynamic_img_size=True, dynamic_img_pad=True)
        except TypeError:  # a network without the options (convolutional ones take any size already)
            body = timm.create_model(arch, **options)
        stages = [(info["module"], body.get_submodule(info["module"])) for info in body.feature_info]
        return HubClassifier(body, source, [(n, m) for n, m in stages if any(True for _ in m.parameters())])
    import torchvision

    body = torchvision.models.get_model(arch, weights=None)
    if hasattr(body, "fc"):  # ResNet layout
        body.fc = nn.Linear(body.fc.in_features, num_classes)
        body.conv1 = adapted_conv(body.conv1, in_channels)
        stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
        stages = [("stem", stem)] + [(f"layer{i}", getattr(body, f"layer{i}")) for i in range(1, 5)]
    else:  # features + classifier layout
        last = max(i for i, m in enumerate(body.classifier) if isinstance(m, nn.Linear))
        body.classifier[last] = nn.Linear(body.classifier[last].in_features, num_classes)
        first = next(path for path, m in body.features.named_modules() if isinstance(m, nn.Conv2d))
        body.features.set_submodule(first, adapted_conv(body.features.get_submodule(first), in_channels))
        stages = [(f"features{i}", block) for i, block in enumerate(body.features)]
    return HubClassifier(body, source, stages)


def adapted_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )


def adapt_input_weights(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters for `in_channels` inputs: summed for grey (a grey image is R = G = B, so each filter's
    response is unchanged), else the mean repeated and rescaled to keep the response's size."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


@dataclass(frozen=True)
class HubWeights:
    """Where `fit` finds a published network's weights; the same protocol as `registry.Pretrained`."""

    name: str
    fit_frontend = None  # the image front end fitted on the data, as for any image model
    lr: float | None = FINE_TUNE_LR
    batch_size: int | None = None
    patience: int | None = None

    def installed(self) -> bool:
        return True

    def files(self, model: str) -> Path:
        """The local weight file, downloaded into the library's cache the first time."""
        source, arch = split_name(self.name)
        return torchvision_file(self.name, arch) if source == "torchvision" else timm_file(self.name, arch)

    def load_weights(self, network: nn.Module, path: Path) -> str:
        source, arch = split_name(self.name)
        if source == "torchvision":
            weights = torch.load(path, map_location="cpu", weights_only=True)  # no code runs (no pickle objects)
        else:
            weights = timm_weights(arch, path, network)
        own = network.body.state_dict()
        copied = {}
        for key, tensor in weights.items():
            if key in own and tensor.ndim == 4 and tensor.shape[1] != own[key].shape[1]:
                tensor = adapt_input_weights(tensor, own[key].shape[1])
            if key in own and own[key].shape == tensor.shape:
                copied[key] = tensor
        network.body.load_state_dict(copied, strict=False)
        return f"started from the published {self.name} weights ({len(copied)}/{len(own)} tensors; {path})"


def torchvision_file(name: str, arch: str) -> Path:
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        require_reachable(name, url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    return path


def timm_file(name: str, arch: str) -> Path:
    import timm
    from huggingface_hub import hf_hub_download

    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id if timm.models.get_pretrained_cfg(arch) else None
    if not repo:
        raise InputError(f"--model {name}: timm publishes no weights for {arch!r}; choose another model")
    try:
        return Path(hf_hub_download(repo, "model.safetensors", local_files_only=True))
    except (OSError, ValueError):  # not in the Hugging Face cache yet
        require_reachable(name, f"https://huggingface.co/{repo}")
        return Path(hf_hub_download(repo, "model.safetensors"))


def timm_weights(arch: str, path: Path, network: nn.Module) -> dict[str, torch.Tensor]:
    """The published tensors through timm's own loading (it adapts the stem to the input channels)."""
    import timm

    in_channels = next(m for m in network.body.modules() if isinstance(m, nn.Conv2d)).in_channels
    published = timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, in_chans=in_channels
    )
    return published.state_dict()


def require_reachable(name: str, url: str) -> None:
    """Fail in one line, quickly, when the weights' host cannot be reached (the libraries retry for minutes)."""
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise InputError(
            f"--model {name}: the published weights cannot be fetched from {host} ({err.strerror or err}); "
            "this machine looks offline. Download them once on a connected machine (they are cached), or "
            "choose a layerwise model (`layerwise models`)"
        ) from None
