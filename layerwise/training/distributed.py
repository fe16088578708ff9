"""Data-parallel training on torch.distributed, started by torchrun (never a home-made launcher or all-reduce).

`layerwise train ... --devices N` re-runs the same command under `torchrun --standalone --nproc-per-node N`;
on many machines a user starts torchrun on each (README, "Many processes: `--devices N` and torchrun"). Every process
reads the data, builds the same network from the same seed and trains on its own slice of each global
batch; DistributedDataParallel averages the gradients, so N processes take the steps one process would
take with the whole batch. Rank 0 alone validates, writes checkpoints and the run directory; its
decisions (stop, time budget, a signal) reach the other ranks through one small all-reduce per step.

`--strategy fsdp` shards instead of replicating (PyTorch's FSDP2, `fully_shard`): each process keeps 1/N of the
weights, gradients and AdamW moments, and gathers a unit's weights only while it computes (see `fully_sharded`).
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.errors import InputError

STRATEGIES = ("ddp", "fsdp")  # --strategy: replicate the model in every process, or shard it across them
# How long ranks wait for each other in a collective (validation on rank 0 included) before failing.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# How long the processes of a `--devices N` run wait for each other to start.
RENDEZVOUS_TIMEOUT_S = 120
INTERRUPTED_EXIT = 130


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: rank `rank` of `world_size` (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes_run(self) -> bool:
        """Only rank 0 writes checkpoints, reports and the run directory."""
        return self.rank == 0


def process_group_from_env() -> ProcessGroup:
    """The group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (none set: a single process)."""
    try:
        return ProcessGroup(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as err:
        raise InputError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from err


def join(group: ProcessGroup, device: torch.device) -> None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); idempotent."""
    if not group.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        # Keys of this attempt only: after a torchrun restart the store may still hold the dead attempt's
        # addresses, and a rank that read one would try to connect to a process that is gone.
        store = dist.PrefixStore(f"layerwise/attempt_{restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as err:
        raise InputError(
            f"rank {group.rank} of {group.world_size} could not join the other processes "
            f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {err}"
        ) from err


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(group: ProcessGroup, name: str) -> str:
    """Each process of a multi-GPU run takes its own GPU (LOCAL_RANK); on CPU they share the cores."""
    if group.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{group.local_rank}"
    return name


# ---------------------------------------------------------------------- batches


def part_of(value: Any, rank: int, world_size: int) -> Any:
    """Rank `rank`'s share of a batch: tensors and lists split along the first (example) dimension into
    `world_size` near-equal parts, tuples and dicts part by part."""
    if isinstance(value, torch.Tensor):
        return value.tensor_split(world_size)[rank]
    if isinstance(value, list):
        bounds = torch.arange(len(value)).tensor_split(world_size)[rank]
        return value[int(bounds[0]) : int(bounds[-1]) + 1] if len(bounds) else []
    if isinstance(value, tuple):
        return tuple(part_of(v, rank, world_size) for v in value)
    if isinstance(value, dict):
        return {k: part_of(v, rank, world_size) for k, v in value.items()}
    return value


class RankBatches:
    """The batches of one rank: global batch `i` of epoch `e`, cut into `world_size` parts, part `rank`.

    The global batches do not depend on the number of processes, so a run resumes with a different
    number of them and the ranks never see the same example. A `Batches` with `epoch_part` cuts its
    index before decoding and augmenting (cheaper); any other is built whole and cut.
    """

    def __init__(self, batches, group: ProcessGroup) -> None:
        self.batches, self.group = batches, group

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Any]]:
        rank, world_size = self.group.rank, self.group.world_size
        epoch_part = getattr(self.batches, "epoch_part", None)
        if epoch_part is not None:
            yield from epoch_part(epoch, start, rank, world_size)
            return
        for inputs, targets in self.batches.epoch(epoch, start):
            yield part_of(inputs, rank, world_size), part_of(targets, rank, world_size)


# ---------------------------------------------------------------------- the model


class LossOf(nn.Module):
    """The task's loss as the forward of one module, so that DistributedDataParallel wraps every task
    alike, whichever methods of the network its loss calls (a recogniser's `loss`, a detector's targets)."""

    def __init__(self, network: nn.Module, objective) -> None:
        super().__init__()
        self.network, self.objective = network, objective

    def forward(self, inputs: Any, targets: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(self.network, inputs, targets)


def data_parallel(step: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the training step (a `LossOf`). Unused parameters are allowed: a frozen backbone, a head
    a batch does not reach."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)


def shard_units(network: nn.Module) -> list[nn.Module]:
    """The modules FSDP gathers one at a time, innermost first: the network's stages (`named_stages()`, the
    blocks its forward runs in turn) or, for a network without them, its direct children that hold parameters.
    A unit that shares a parameter with the rest of the network (a tied embedding) is left to the whole."""
    candidates = [m for _, m in network.named_stages()] if hasattr(network, "named_stages") else [
        m for m in network.children() if any(True for _ in m.parameters())
    ]  # fmt: skip
    names = {id(m): name for name, m in network.named_modules()}
    every_parameter = list(network.named_parameters(remove_duplicate=False))
    units = []
    for unit in sorted(candidates, key=lambda m: -names.get(id(m), "").count(".")):
        prefix = names.get(id(unit), "") + "."
        inside = {id(p) for p in unit.parameters()}
        tied = any(id(p) in inside and not name.startswith(prefix) for name, p in every_parameter)
        if inside and not tied and unit is not network:
            units.append(unit)
    return units


def fully_sharded(step: LossOf, device: torch.device) -> LossOf:
    """Shard the training step's network across the process group (FSDP2). Each unit's weights are gathered for
    its forward and backward and freed after; its gradients are reduce-scattered, averaged over ranks as DDP
    averages them, so the steps equal one process's on the whole batch. The step itself is the outermost unit:
    whatever the task's loss calls on the network (not only `forward`) sees whole weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units(step.network):
        fully_shard(unit, mesh=mesh)
    fully_shard(step, mesh=mesh)
    # A parameter a rank's batch does not reach (a head no example of its part needs) still takes part in the
    # gradient reduction, with zeros, or the ranks' collectives would no longer pair up (DDP's
    # find_unused_parameters). Frozen parameters (requires_grad off) stay out on every rank alike.
    step.set_reduce_scatter_unused_params(True)
    return step


# ---------------------------------------------------------------------- agreeing between ranks


def agree(
    group: ProcessGroup, loss: torch.Tensor, clock: float, stop_flags: list[bool]
) -> tuple[torch.Tensor, float, list[bool]]:
    """One all-reduce per step: the mean loss over ranks, rank 0's clock (seconds of training, which drive
    the schedule and the time budget), and each stop flag raised by any rank."""
    if not group.distributed:
        return loss, clock, stop_flags
    own_clock = clock if group.rank == 0 else 0.0
    values = [float(loss.detach()), own_clock, *map(float, stop_flags)]
    # On the loss's device: NCCL reduces CUDA tensors only.
    values = torch.tensor(values, dtype=torch.float64, device=loss.device)
    dist.all_reduce(values)
    agreed = values.tolist()
    return (values[0] / group.world_size).to(loss.dtype), agreed[1], [v > 0 for v in agreed[2:]]


def from_rank0(group: ProcessGroup, value: Any) -> Any:
    """Rank 0's `value` (any JSON-like object) on every rank."""
    if not group.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- launching


def launch(devices: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run `layerwise <argv>` as `devices` processes under torchrun on this machine; returns the exit code.

    On CPU each process gets an equal share of the cores (torchrun's default would be one thread each).
    """
    if devices < 1:
        raise InputError(f"--devices must be at least 1, not {devices}")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
        f"--max-restarts={max_restarts}", "--rdzv-conf", f"join_timeout={RENDEZVOUS_TIMEOUT_S}",
        "-m", "layerwise", *argv,
    ]  # fmt: skip
    print(f"launching {devices} processes: {shlex.join(command[2:])}", file=sys.stderr)
    process = subprocess.Popen(command, env=env)
    interrupted = False
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C: wait while its processes checkpoint and stop
            interrupted = True
    if interrupted:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    if code != 0:
        print(
            f"the {devices}-process run failed (exit code {code}); torchrun's summary above names the rank "
            "that failed first. What was trained up to the last checkpoint is kept: rerun with --resume.",
            file=sys.stderr,
        )
    return code


def restart_count() -> int:
    """How many times torchrun restarted this run's processes (--max-restarts) after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun restarted after a failure: it resumes the run."""
    return restart_count() > 0
