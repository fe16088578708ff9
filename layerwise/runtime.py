"""Where and how a network runs: device choice, mixed precision, moving batches, batched inference.

Inference (`layerwise.load`, `Model.predict`, a server) needs only this module, never the training loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast: on CUDA when supported, on CPUs with native bf16 (AVX512-BF16/AMX)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu" and torch.backends.mkldnn.is_available() and _cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def channels_last_for(model: nn.Module, device: torch.device) -> bool:
    """oneDNN convolutions are faster in NHWC on CPU."""
    return device.type == "cpu" and has_conv(model)


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
