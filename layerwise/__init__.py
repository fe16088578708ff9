"""layerwise: raw images, audio and text in; a trained deep network with the evidence to trust it out."""

__version__ = "0.1.0"

from layerwise.bundle import Model, load  # noqa: E402
from layerwise.models.registry import create_model, list_models  # noqa: E402

__all__ = ["Model", "TrainConfig", "__version__", "create_model", "fit", "list_models", "load", "train"]


def __getattr__(name: str):
    # Training is imported on first use, so `layerwise.load` (inference, a server) never imports the
    # training loop, progress bars, signal handling or checkpoint code.
    if name == "fit":
        from layerwise.api import fit

        return fit
    if name in ("train", "TrainConfig"):
        from layerwise.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
