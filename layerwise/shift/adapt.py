"""`layerwise adapt`: test-time adaptation of a trained network to new conditions from unlabelled inputs.

Networks with BatchNorm re-estimate its statistics on the new inputs (Schneider et al. 2020, "Improving
robustness against common corruptions by covariate shift adaptation"): a darkened image moves every
channel's mean and variance, and the layers after it expect the old ones. Other networks (LayerNorm
transformers) minimise the entropy of their predictions by tuning only the normalisation scales and
shifts (TENT, Wang et al. 2021): few parameters, so a few hundred inputs cannot wreck the features.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from layerwise.runtime import channels_last_for, model_device, to_device

TENT_LR = 1e-4
TENT_EPOCHS = 1

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def has_batchnorm(network: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


def method_for(network: nn.Module) -> str:
    return (
        "batchnorm statistics re-estimated" if has_batchnorm(network) else "TENT (entropy minimisation of norm layers)"
    )


@torch.no_grad()
def reestimate_batchnorm(network: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm's running mean and variance by their average over the new inputs."""
    device = model_device(network)
    channels_last = channels_last_for(network, device)
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch counts equally
    network.eval()
    for norm in norms:
        norm.train()  # only the norms update statistics; dropout stays off
    for inputs in batches:
        network(to_device(inputs, device, channels_last))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    network.eval()


def tent(network: nn.Module, batches: Iterable[torch.Tensor], epochs: int = TENT_EPOCHS, lr: float = TENT_LR) -> None:
    """Minimise the mean prediction entropy over the new inputs, updating only normalisation affine parameters."""
    device = model_device(network)
    channels_last = channels_last_for(network, device)
    parameters = [
        p for m in network.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)
    ]  # fmt: skip
    if not parameters:
        raise ValueError("this network has no normalisation layers to adapt")
    for p in network.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    network.eval()  # dropout off: the entropy should measure the network, not the noise
    batches = list(batches)
    for _ in range(epochs):
        for inputs in batches:
            log_p = torch.log_softmax(network(to_device(inputs, device, channels_last)).float(), dim=1)
            entropy = -(log_p.exp() * log_p).sum(1).mean()
            optimizer.zero_grad()
            entropy.backward()
            optimizer.step()
    for p in network.parameters():
        p.requires_grad_(True)
    network.eval()


def adapt(network: nn.Module, batches: Iterable[torch.Tensor]) -> str:
    """Adapt `network` in place to the inputs (model-ready batches); returns the method used."""
    if has_batchnorm(network):
        reestimate_batchnorm(network, batches)
    else:
        tent(network, batches)
    return method_for(network)


def adapt_run(run_dir: str | Path, data: str | Path, out: str | Path) -> dict:
    """Load a run, adapt it to `data`, write the result as a new run directory `out`; returns adaptation.json.

    The new run keeps the original's preprocessing, labels and calibration. Its shift reference is not
    copied: the adapted network's embeddings moved on purpose, so the old reference no longer describes it
    (`layerwise shift --fit-reference` fits one from labelled data of the new conditions).
    """
    from layerwise.bundle import load
    from layerwise.errors import InputError
    from layerwise.files import write_json

    out = Path(out)
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise InputError(f"--out {out} already holds a run; choose another folder")
    if out.resolve() == Path(run_dir).resolve():
        raise InputError("--out must differ from RUN: adaptation writes a new run and keeps the original")
    bundle = load(run_dir)
    report = bundle.adapt(data)
    problems = report.pop("problems")
    report |= {"source_run": str(run_dir), "data": str(data), "skipped": len(problems)}
    bundle.task.shift_reference = None
    bundle.config["adapted_from"] = report
    bundle.save(out)
    write_json(out / "adaptation.json", report | {"skipped_inputs": [p.to_json() for p in problems]})
    return report
