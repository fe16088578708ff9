"""layerwise: raw images, audio and text in; a trained deep network with the evidence to trust it out."""

__version__ = "0.1.0"

__all__ = ["Model", "TrainConfig", "__version__", "create_model", "fit", "list_models", "load", "train"]


def __getattr__(name: str):
    # Everything is imported on first use: `layerwise.load` (inference, a server) never imports the training
    # loop, progress bars, signal handling or checkpoint code, and the command line can set up the process
    # (OpenMP's wait policy) before torch is imported.
    if name in ("Model", "load"):
        from layerwise import bundle

        return getattr(bundle, name)
    if name in ("create_model", "list_models"):
        from layerwise.models import registry

        return getattr(registry, name)
    if name == "fit":
        from layerwise.api import fit

        return fit
    if name in ("train", "TrainConfig"):
        from layerwise.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
