"""layerwise: raw images, audio and text in; a trained deep network with the evidence to trust it out."""

__version__ = "0.1.0"

import os  # noqa: E402

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). On a machine where other
# programs hold some of the cores, a spinning thread burns the time slice its partner needs: training ran 2.3x
# faster with two CPU-bound processes beside it, and the same on a quiet machine (benchmarks/busy_machine.py).
# It only counts when set before the OpenMP runtime starts, i.e. before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
