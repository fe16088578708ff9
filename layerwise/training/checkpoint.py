"""Resumable training state, written atomically, without pickle.

A checkpoint is a folder `checkpoints/step_000123/` holding `tensors.safetensors` (weights, optimizer
moments, RNG state) and `state.json` (everything else, plus the sha256 of the tensor file). It is
written into a temporary folder, fsynced, then renamed, so a kill mid-write never leaves a
checkpoint that looks complete; a damaged one fails its checksum and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

KEEP_LAST = 2  # checkpoints kept besides the newest one being written
STATE_FILE, TENSOR_FILE = "state.json", "tensors.safetensors"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the model."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: dict  # {"loop": LoopState fields, "param_groups": optimizer settings, "config": TrainConfig}
    tensors: dict[str, torch.Tensor]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy (safetensors needs contiguous; channels-last weights are not)."""
    return torch.empty_like(tensor, device="cpu", memory_format=torch.contiguous_format).copy_(tensor.detach())


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is FSDP's DTensor. Asked without importing torch.distributed.tensor (0.6 s of every
    command's start): no DTensor exists unless FSDP has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (FSDP's DTensor: gathered from every rank, so every rank must call this in the
    same order); any other tensor as it is."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def shaped_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) as `like` holds it: this rank's shard of it where `like` is sharded (every rank
    holds the same whole value, so each cuts its own shard with no communication), else `value` itself."""
    if not is_shard(like) or is_shard(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    local = value.to(device=like.to_local().device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Copies of the model weights, optimizer moments and torch RNG state as flat named tensors. Sharded ones
    (FSDP) are saved whole, so a checkpoint resumes with any number of processes and either strategy."""
    tensors = {f"model.{k}": cpu_copy(whole(v)) for k, v in model.state_dict().items()}
    for index, state in sorted(optimizer.state_dict()["state"].items()):
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = cpu_copy(whole(torch.as_tensor(value)))
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_training_tensors(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors = checkpoint.tensors
    current = model.state_dict()
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict({k: shaped_like(v, current[k]) if k in current else v for k, v in weights.items()})
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            optim_state.setdefault(int(index), {})[key] = value
    saved_groups = checkpoint.state["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{checkpoint.path}: {len(saved_groups)} optimizer parameter groups, the network has "
            f"{len(optimizer.param_groups)}"
        )
    # Sharded parameters (FSDP) take their shard of each moment now, before the optimizer moves moments to the
    # device: never every whole moment on one device at once.
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, state in optim_state.items():
        if index < len(params) and is_shard(params[index]):
            param = params[index]
            for key, value in state.items():
                if value.shape == param.shape:
                    state[key] = shaped_like(value, param)
    # The optimizer's implementation is this process's (fused or not: see `make_optimizer`), whichever one saved it.
    groups = [
        saved | {k: current[k] for k in ("fused", "foreach") if k in current}
        for saved, current in zip(saved_groups, optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    # Moments in their parameter's layout (channels-last convolutions): they are saved contiguous, and a fused
    # optimizer walks a parameter and its moments in memory order, so different layouts would pair wrong elements.
    for param in params:
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write `directory/step_<global_step>/` atomically and prune old ones. Returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{state['loop']['global_step']:09d}"
    staging = directory / f".tmp_{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, str(staging / TENSOR_FILE))
    _fsync(staging / TENSOR_FILE)
    state = {**state, "sha256": sha256(staging / TENSOR_FILE)}
    (staging / STATE_FILE).write_text(json.dumps(state))
    _fsync(staging / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync(directory)
    for old in list_checkpoints(directory)[: -(KEEP_LAST + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if p.is_dir())


def load_latest_checkpoint(directory: Path, warn=print) -> Checkpoint:
    """The newest checkpoint whose checksum verifies; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            if sha256(path / TENSOR_FILE) != state["sha256"]:
                raise ValueError("checksum mismatch")
            return Checkpoint(path, state, load_file(str(path / TENSOR_FILE)))
        except (OSError, ValueError, KeyError) as err:
            warn(f"checkpoint {path} is damaged ({err}); trying the previous one")
    raise CheckpointError(f"{directory}: no usable checkpoint to resume from")
