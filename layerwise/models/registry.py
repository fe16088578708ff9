"""Named model builders and `create_model(name, **config)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from layerwise.errors import InputError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    modalities: tuple[str, ...]  # which inputs it suits: "image", "audio" (spectrograms), "text", "protein"
    tasks: tuple[str, ...] = ("classify",)  # which task heads it carries


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, modalities: tuple[str, ...], tasks: tuple[str, ...] = ("classify",)) -> Callable:
    """Decorator: make a builder available to `create_model` and `--model`."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, build, modalities, tasks)
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
    _load_builtin_models()
    if name not in _REGISTRY:
        raise InputError(f"--model: unknown model {name!r} (known: {', '.join(list_models())})")
    return _REGISTRY[name]


def create_model(name: str, **config) -> nn.Module:
    """Build a registered model, e.g. `create_model("convnet_s", in_channels=1, num_classes=10)`."""
    return model_entry(name).build(**config)


def _load_builtin_models() -> None:
    # Imported here, not at module import, so the registry has no import-time side effects elsewhere.
    from layerwise.models import convnet, detector, folder, gpt, recogniser, resnet, transformer  # noqa: F401
