"""Where and how a network runs: device choice, mixed precision, moving batches, batched inference.

Inference (`layerwise.load`, `Model.predict`, a server) needs only this module, never the training loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from layerwise.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """auto: a CUDA GPU when there is one, else the CPU; an explicit device that is not there fails clearly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; try --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: Apple's MPS backend is not available here; try --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: layerwise runs on cpu, cuda or mps")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and _cpu_has_bf16():
        return "bf16"
    return "fp32"


def autocast_to(device: torch.device, precision: str):
    """Autocast to a resolved precision (fp32: none). fp16 needs loss scaling in training (the loop does it)."""
    if precision == "fp32" or device.type not in ("cpu", "cuda", "mps"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def autocast_for(device: torch.device, enabled: bool):
    """Inference's autocast: bf16 where the hardware has it natively, else none."""
    return autocast_to(device, resolve_precision("auto" if enabled else "fp32", device))


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def channels_last_for(model: nn.Module, device: torch.device) -> bool:
    """Convolutions are faster in NHWC: oneDNN's on CPU, cuDNN's tensor-core kernels on CUDA."""
    return device.type in ("cpu", "cuda") and has_conv(model)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`, channels-last where its convolutions run faster so."""
    model.to(device)
    if channels_last_for(model, device):
        model.to(memory_format=torch.channels_last)  # oneDNN convolutions are faster in NHWC
    return model


def to_device(value: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a tensor, or tensors nested in lists/tuples/dicts (e.g. per-image boxes), to `device`."""
    if isinstance(value, torch.Tensor):
        value = value.to(device, non_blocking=True)
        return value.contiguous(memory_format=torch.channels_last) if channels_last and value.ndim == 4 else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, channels_last) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, channels_last) for k, v in value.items()}
    return value


def host_to(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small tensor made on the host (random draws, indices), on `device` without making the host wait for
    the GPU's queue: a plain copy from pageable memory would wait for every kernel queued before it."""
    if device.type != "cuda":
        return value.to(device)
    return value.pin_memory().to(device, non_blocking=True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches, device: torch.device | None = None, mixed_precision: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (N, ...) in float32 and targets (N, ...) for every batch of epoch 0, in order."""
    device = device or model_device(model)
    channels_last = channels_last_for(model, device)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches.epoch(0):
        with autocast_for(device, mixed_precision):
            logits.append(model(to_device(x, device, channels_last)).float().cpu())
        labels.append(y)
    model.train(was_training)
    if not logits:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def predict_embeddings(
    model: nn.Module, batches, device: torch.device | None = None, mixed_precision: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled embeddings (N, D) from `forward_head(..., pre_logits=True)`, outputs (N, ...) and targets, in one pass."""
    device = device or model_device(model)
    channels_last = channels_last_for(model, device)
    was_training = model.training
    model.eval()
    embeddings, logits, labels = [], [], []
    for x, y in batches.epoch(0):
        with autocast_for(device, mixed_precision):
            features = model.forward_features(to_device(x, device, channels_last))
            embeddings.append(model.forward_head(features, pre_logits=True).float().cpu())
            logits.append(model.forward_head(features).float().cpu())
        labels.append(y)
    model.train(was_training)
    if not logits:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(embeddings), torch.cat(logits), torch.cat(labels)
