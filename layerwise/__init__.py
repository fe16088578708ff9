"""layerwise: raw images, audio and text in; a trained deep network with the evidence to trust it out."""

__version__ = "0.1.0"

from layerwise.api import fit, load  # noqa: E402
from layerwise.bundle import Model  # noqa: E402
from layerwise.models.registry import create_model, list_models  # noqa: E402
from layerwise.train.loop import TrainConfig, train  # noqa: E402

__all__ = ["Model", "TrainConfig", "__version__", "create_model", "fit", "list_models", "load", "train"]
