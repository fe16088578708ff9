"""`--model torchvision:NAME` / `timm:NAME`: published networks, their weights from the libraries' own caches."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import layerwise
from layerwise.errors import InputError
from layerwise.models.registry import load_pretrained


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # where hf_hub_download looks
    return tmp_path / "hf"


def published_resnet18(torch_cache) -> dict[str, torch.Tensor]:
    """Weights saved where torchvision's download would have put them (its cache layout and file name)."""
    import torchvision

    torch.manual_seed(1)
    weights = torchvision.models.resnet18().state_dict()
    torch_cache.mkdir(parents=True)
    torch.save(weights, torch_cache / "resnet18-f37072fd.pth")
    return weights


def test_torchvision_weights_come_from_the_local_cache(torch_cache) -> None:
    published = published_resnet18(torch_cache)
    network = layerwise.create_model("torchvision:resnet18", in_channels=1, num_classes=3)
    message = load_pretrained("torchvision:resnet18", network)
    assert "published torchvision:resnet18" in message
    own = network.body.state_dict()
    assert torch.equal(own["layer3.0.conv1.weight"], published["layer3.0.conv1.weight"])
    # Grey input: the RGB filters are summed, so a grey image gives each filter the same response.
    assert torch.allclose(own["conv1.weight"], published["conv1.weight"].sum(dim=1, keepdim=True))
    assert own["fc.weight"].shape == (3, 512)  # a new head
    grey = torch.rand(2, 1, 28, 28)
    assert network(grey).shape == (2, 3)
    assert [name for name, _ in network.named_stages()] == ["stem", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    ("arch", "tensor"),
    [("convnext_nano", "stages.2.blocks.0.conv_dw.weight"), ("vit_tiny_patch16_224", "blocks.5.attn.qkv.weight")],
)
def test_timm_weights_come_from_the_hugging_face_cache(hf_cache, arch: str, tensor: str) -> None:
    import timm

    torch.manual_seed(2)
    published = timm.create_model(arch).state_dict()
    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    commit = "0" * 40
    folder = hf_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(published, str(folder / "snapshots" / commit / "model.safetensors"))

    network = layerwise.create_model(f"timm:{arch}", in_channels=3, num_classes=4)
    assert f"published timm:{arch}" in load_pretrained(f"timm:{arch}", network)
    assert torch.equal(network.body.state_dict()[tensor], published[tensor])
    # Any image size, also for a vision transformer published for 224x224 (positions are resampled).
    for side in (28, 40, 100):
        assert network.forward_head(network.forward_features(torch.rand(1, 3, side, side))).shape == (1, 4)
    from layerwise.explain import attribute

    for method in ("ig", "gradcam"):  # maps at the input's size (a transformer's tokens laid on its patch grid)
        (attribution,) = attribute(network.eval(), torch.rand(1, 3, 40, 30), torch.tensor([1]), method)
        assert attribution.scores.shape[-2:] == (40, 30) and torch.isfinite(attribution.scores).all()


def test_offline_the_weights_cannot_be_fetched_in_one_clear_line(torch_cache, hf_cache) -> None:
    for name in ("torchvision:resnet18", "timm:convnext_nano"):
        network = layerwise.create_model(name, in_channels=3, num_classes=2)
        started = time.perf_counter()
        with pytest.raises(InputError, match="cannot be fetched from .*offline"):
            load_pretrained(name, network)
        assert time.perf_counter() - started < 30  # not minutes of the library's retries


def test_an_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(InputError, match="timm:convnext_nano"):
        layerwise.create_model("timm:convnext_nanno", in_channels=3, num_classes=2)
    with pytest.raises(InputError, match="torchvision:resnet18"):
        layerwise.create_model("torchvision:resnet19", in_channels=3, num_classes=2)
    with pytest.raises(InputError, match="torchvision:ARCH or timm:ARCH"):
        layerwise.create_model("keras:resnet18", in_channels=3, num_classes=2)


@pytest.mark.slow
def test_a_run_on_a_published_network_trains_saves_and_loads_offline(torch_cache, fashion_train, tmp_path) -> None:
    published_resnet18(torch_cache)
    data = tmp_path / "data"
    for name in ("bag", "trouser"):
        (data / name).mkdir(parents=True)
        for image in sorted((fashion_train / name).glob("*.png"))[:25]:
            shutil.copy(image, data / name)
    model = layerwise.fit(
        data, tmp_path / "run", model="torchvision:resnet18", epochs=1, batch_size=16, show_progress=False
    )
    assert model.summary["approach"] == "fine-tuned from torchvision:resnet18's published weights"
    shutil.rmtree(torch_cache)  # a saved run needs no download
    loaded = layerwise.load(tmp_path / "run")
    image = next((data / "bag").glob("*.png"))
    predictions, problems = loaded.predict([image])
    assert not problems and predictions[0].label in ("bag", "trouser")
