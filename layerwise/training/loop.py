"""The one training loop: AdamW, warmup + cosine, mixed precision, early stopping, checkpoints.

Read top to bottom in `train()`. Everything it needs comes in as arguments (the task's loss and
evaluation included: the loop never asks which task it trains); everything it learned goes out in
the `TrainResult` (and, when `out_dir` is given, history.jsonl and checkpoints/).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from layerwise.errors import InputError
from layerwise.runtime import (
    PRECISIONS,
    autocast_to,
    channels_last_for,
    prepare_model,
    resolve_device,
    resolve_precision,
    to_device,
)
from layerwise.tasks.base import Batches, Objective, score
from layerwise.training.checkpoint import (
    Checkpoint,
    cpu_copy,
    list_checkpoints,
    load_latest_checkpoint,
    restore_training_tensors,
    save_checkpoint,
    training_tensors,
    whole,
)
from layerwise.training.distributed import (
    STRATEGIES,
    LossOf,
    RankBatches,
    agree,
    data_parallel,
    device_for,
    from_rank0,
    fully_sharded,
    join,
    leave,
    process_group_from_env,
)
from layerwise.training.memory import accumulate, count_examples, hold_on_device, release_memory

MAX_BAD_STEPS = 5  # consecutive non-finite steps before rolling back to the last good state
MAX_ROLLBACKS = 1  # roll-backs before giving up
ROLLBACK_LR_FACTOR = 0.1
# On a GPU the host reads the steps' outcomes (finite or not, the loss, the statistics) back once per this many
# steps instead of after each: every read waits for the GPU to finish, and then the GPU waits for the host to
# launch the next step. A non-finite step is still skipped at once, on the GPU (see `_apply_gradients`).
SETTLE_EVERY = 16


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3  # peak learning rate of AdamW
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # of the whole run, linear warmup before the cosine decay
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    patience: int = 6  # epochs without a better validation score before stopping early
    # ... and at least this many optimizer steps: on tiny data an epoch is a handful of steps, and a few
    # epochs of a noisy 10-example validation score would stop while the learning rate is still near its peak.
    patience_min_steps: int = 100
    time_budget_s: float | None = None  # stop cleanly (keeping the best model) after this many seconds
    seed: int = 0
    precision: str = "auto"  # fp32, bf16, fp16 (autocast; fp16 with loss scaling); auto: bf16 where native
    compile: bool = False  # torch.compile the training step (the saved weights never carry its names)
    checkpoint_every_s: float = 300.0  # also checkpoint mid-epoch at most this often
    device: str = "auto"
    strategy: str = "ddp"  # over several processes: replicate the network (DDP) or shard it (FSDP)
    # Transfer learning (--init): the backbone's stages (`named_stages()`) stay fixed for this fraction of the
    # run while the new head learns, then re-warm up; each stage further from the head learns at
    # `layer_decay` times the rate of the stage after it (earlier layers hold the more general features).
    freeze_fraction: float = 0.0
    layer_decay: float = 1.0
    # Backbone parameters that --init could not fill (a new tokenizer's embeddings, a widened first layer): they
    # start from random values, so they learn like the head, never frozen and at the full rate.
    fresh_parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, not {self.batch_size}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise InputError(f"--time-budget must be positive, not {self.time_budget_s}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"warmup fraction must be in [0, 1), not {self.warmup_fraction}")
        if not 0 <= self.freeze_fraction < 1:
            raise InputError(f"--freeze-fraction must be in [0, 1), not {self.freeze_fraction}")
        if not 0 < self.layer_decay <= 1:
            raise InputError(f"--layer-decay must be in (0, 1], not {self.layer_decay}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy {self.strategy}: choose one of {', '.join(STRATEGIES)}")


STOP_EPOCHS, STOP_TIME_BUDGET, STOP_EARLY = "epochs", "time_budget", "early_stopping"


@dataclass
class LoopState:
    """Where training stands; saved as JSON in every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained on
    global_step: int = 0
    bad_epochs: int = 0  # epochs since the best validation score
    best_epoch: int = -1
    best_step: int = 0  # global_step at the best epoch
    best_score: float = -math.inf  # the task's monitored metric, signed so that higher is better
    seconds: float = 0.0  # training wall time before this process
    lr_scale: float = 1.0  # lowered after a roll-back from non-finite losses
    rollbacks: int = 0
    lr: float = 0.0  # of the last step, for history.jsonl (also when a resumed epoch has no step left)
    epoch_loss_sum: float = 0.0  # running sums of the current epoch, for history.jsonl
    epoch_stat_sums: dict[str, float] = field(default_factory=dict)
    epoch_seen: int = 0  # batches of the current epoch that counted towards the sums
    stop_kind: str = ""  # why training ended ("" while it has not): STOP_EPOCHS, STOP_TIME_BUDGET, STOP_EARLY
    stop_reason: str = ""  # the same in words
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_json(cls, saved: dict) -> LoopState:
        state = cls(**saved)
        if "best_step" not in saved and 0 < state.best_epoch <= len(state.history):  # saved before best_step existed
            state.best_step = state.history[state.best_epoch - 1]["step"]
        return state

    def finished_under(self, config: TrainConfig) -> bool:
        """True when this state has nothing left to train under `config` (which may allow more)."""
        if self.stop_kind == STOP_EARLY:
            return True
        if self.stop_kind == STOP_TIME_BUDGET:
            return config.time_budget_s is not None and config.time_budget_s <= self.seconds
        if self.stop_kind == STOP_EPOCHS:
            return config.epochs <= self.epoch
        return False


@dataclass
class TrainResult:
    history: list[dict]
    best_epoch: int
    best_score: float  # signed so that higher is better
    stop_reason: str
    seconds: float
    global_step: int

    @property
    def best_accuracy(self) -> float:
        """The best validation score; for classification (the default objective) it is the accuracy."""
        return self.best_score


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite; the message says since which step."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first so `--resume` can continue."""


def learning_rate(config: TrainConfig, progress: float) -> float:
    """Linear warmup to `config.lr`, then cosine decay to 1% of it. `progress` in [0, 1]."""
    if progress < config.warmup_fraction:
        return config.lr * progress / config.warmup_fraction
    decay = (progress - config.warmup_fraction) / (1 - config.warmup_fraction)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, decay))))


def stage_depths(model: nn.Module) -> dict[str, int]:
    """Parameter name -> how many stages lie between its stage and the head (1 = the last stage).

    Parameters registered before the first stage (a stem that `named_stages()` leaves out, as timm's feature
    stages do) count as the earliest layer. Those after (the head, final norms) are absent: they learn at the
    full rate.
    """
    named_stages = getattr(model, "named_stages", None)
    stages = named_stages() if named_stages is not None else []
    owner = {id(param): len(stages) - i for i, (_, stage) in enumerate(stages) for param in stage.parameters()}
    depths, seen_stage = {}, False
    for name, param in model.named_parameters():
        seen_stage = seen_stage or id(param) in owner
        if id(param) in owner:
            depths[name] = owner[id(param)]
        elif not seen_stage:
            depths[name] = len(stages) + 1
    return depths


def make_optimizer(model: nn.Module, config: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; biases, norms and embeddings (1-D or position tables) get no weight decay. `fused` (default: on the
    CPU): one kernel per step, which on a GPU can also skip a step on the device's word (`found_inf`) without the
    host waiting (the loop asks for it there). On the CPU it is 4-10x faster than PyTorch's default
    loop over tensors (`benchmarks/optimizer_step.py`: the detector's step 0.5 ms instead of 2.8, about 4% of a
    training step; gpt_small's 2.4 instead of 24); the same update up to float rounding (3e-8 after 20 steps).

    One group per (stage, decay or not): a group's `lr_scale` is the layer-wise decay of its stage and
    `backbone` marks the stages that a transfer schedule freezes first (see `group_learning_rate`).
    """
    depths = stage_depths(model) if config.freeze_fraction > 0 or config.layer_decay < 1 else {}
    for name in config.fresh_parameters:
        depths.pop(name, None)  # random values: nothing to protect
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = param.ndim <= 1 or "positions" in name or "embed" in name
            groups.setdefault((depths.get(name, 0), no_decay), []).append(param)
    param_groups = [
        {
            "params": params, "weight_decay": 0.0 if no_decay else config.weight_decay,
            "lr_scale": config.layer_decay**depth, "backbone": depth > 0,
        }
        for (depth, no_decay), params in sorted(groups.items())
    ]  # fmt: skip
    if fused is None:
        fused = next(model.parameters()).device.type == "cpu"
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=(0.9, 0.99), fused=fused)


def set_backbone_frozen(optimizer: torch.optim.Optimizer, frozen: bool) -> None:
    for group in optimizer.param_groups:
        if group.get("backbone"):
            for param in group["params"]:
                param.requires_grad_(not frozen)


def group_learning_rate(config: TrainConfig, group: dict, lr: float, progress: float) -> float:
    """A group's rate at `progress`: zero for the backbone while frozen, then a linear re-warmup over the
    schedule's warmup length (a jump to the full rate would wreck the transferred features), times its decay."""
    scale = group.get("lr_scale", 1.0)
    if group.get("backbone") and config.freeze_fraction > 0:
        thawed = (progress - config.freeze_fraction) / max(config.warmup_fraction, 1e-9)
        scale *= min(1.0, max(0.0, thawed))
    return lr * scale


@contextmanager
def _stop_requests():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (restored afterwards)."""
    requested: list[int] = []
    previous = {}

    def handler(signum, _frame):
        requested.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.fields[stats]}  {task.fields[rate]:.0f} batches/s"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        disable=not enabled,
        transient=False,
    )


def train(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    config: TrainConfig,
    out_dir: Path | None = None,
    resume: bool | Checkpoint | None = False,
    show_progress: bool = True,
    log=print,
    objective: Objective | None = None,
) -> TrainResult:
    """Fit `model` on `train_batches`, keeping the weights with the best validation score.

    `objective` gives the loss and the validation metrics (default: classification with
    cross-entropy, monitored by accuracy). With `out_dir`: appends one line per epoch to
    out_dir/history.jsonl and writes resumable checkpoints to out_dir/checkpoints/. With
    `resume=True`: continues from the newest good checkpoint (or from the one passed).
    Under torchrun (WORLD_SIZE > 1) each process trains on its part of every batch and only rank 0
    validates and writes (see training/distributed.py); the processes join their group here and leave it
    when training ends.
    """
    if objective is None:
        from layerwise.tasks.classify import CrossEntropyObjective

        objective = CrossEntropyObjective(config.label_smoothing)
    group = process_group_from_env()
    device = resolve_device(device_for(group, config.device))
    join(group, device)
    try:
        return train_in_group(
            model, train_batches, val_batches, config, out_dir, resume, show_progress, log, objective, group, device
        )
    finally:
        # Left as soon as training ends: what follows is rank 0's alone. A process that exits with its group alive,
        # or with DistributedDataParallel's reducer (and gloo's pending work on its tensors) still waiting in a
        # reference cycle, can abort while the interpreter shuts down ("terminate called without an active
        # exception", seen 2 runs in 5 of tests/test_distributed.py): both are released here, while it is alive.
        if group.distributed:
            gc.collect()
        leave()


def train_in_group(
    model: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    config: TrainConfig,
    out_dir: Path | None,
    resume: bool | Checkpoint | None,
    show_progress: bool,
    log,
    objective: Objective,
    group,
    device: torch.device,
) -> TrainResult:
    """`train`'s work, in a process group already joined (or none)."""
    writes = group.writes_run
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    sharded = group.distributed and config.strategy == "fsdp"
    # Under FSDP the optimizer steps a sharded copy (`trained`); `model` stays whole: rank 0 validates it, and it
    # holds the best weights and the result. It takes the trained weights before each validation (`gather`).
    # Otherwise both names are the same network.
    trained = model
    if sharded:
        if config.compile:
            raise InputError("--compile with --strategy fsdp is not supported; train without --compile or with ddp")
        # Copied where it was built (the CPU): fully_shard moves only this rank's shard to the device. FSDP shards
        # contiguous parameters only, so the copy leaves channels-last behind (the inputs keep it).
        whole_copy = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        sharded_step = fully_sharded(LossOf(whole_copy, objective), device)
        trained = sharded_step.network
    if writes or not sharded:  # under FSDP only rank 0 validates: the others keep `model` off the device
        model = prepare_model(model, device)
    channels_last = channels_last_for(model, device)
    # On a single GPU (not fp16, whose scaler reads its overflow check on the host), the host does not wait for
    # each step: outcomes are settled every SETTLE_EVERY steps. Elsewhere every step is settled as it ends.
    deferred = device.type == "cuda" and precision != "fp16" and not group.distributed
    # Fused AdamW on the CPU (one kernel instead of a Python loop over the weights) and where the steps are
    # deferred; not on sharded weights, and not yet on GPUs otherwise (fp16, several processes: not run there).
    optimizer = make_optimizer(trained, config, fused=deferred or (device.type == "cpu" and not sharded))
    # fp16 overflows where bf16 does not: its loss is scaled up, and steps with inf gradients are skipped
    # by the scaler (which lowers the scale) rather than counted as divergence.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if len(train_batches) == 0 or len(val_batches) == 0:
        raise InputError("training needs at least one training batch and one validation batch")
    total_steps = config.epochs * len(train_batches)
    checkpoint_dir = out_dir / "checkpoints" if out_dir else None

    state = LoopState()
    best_weights = _cpu_copy(model.state_dict())
    if resume:
        checkpoint = resume if isinstance(resume, Checkpoint) else load_latest_checkpoint(checkpoint_dir, warn=log)
        restore_training_tensors(checkpoint, trained, optimizer)
        if "grad_scaler" in checkpoint.state and scaler.is_enabled():
            scaler.load_state_dict(checkpoint.state["grad_scaler"])
        state = LoopState.from_json(checkpoint.state["loop"])
        best_weights = _prefixed(checkpoint.tensors, "best.")
        if state.finished_under(config):
            log(f"the run had already finished ({state.stop_reason}); nothing more to train")
        else:
            state.stop_kind = state.stop_reason = ""
            log(f"resuming from {checkpoint.path.name}: epoch {state.epoch + 1}, step {state.step_in_epoch}")
    elif writes and checkpoint_dir is not None and list_checkpoints(checkpoint_dir):
        raise InputError(
            f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )
    if from_rank0(group, state.global_step) != state.global_step:  # every rank must start from the same step
        raise InputError(
            f"rank {group.rank} would start at step {state.global_step} but rank 0 at another: every process must "
            f"read the same run folder ({out_dir}); on several machines, give --out a folder they all share"
        )
    if out_dir is not None and writes:  # history.jsonl holds exactly the epochs the (restored) state has seen
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history))

    # The step runs through one module: the task's loss on the network (compiled on request), data-parallel
    # under torchrun. Checkpoints and run files hold `model`'s own weights: no `_orig_mod.`/`module.` names,
    # so they load and resume whether or not the next run compiles or spreads over processes.
    if sharded:
        step = sharded_step
    else:
        step = LossOf(torch.compile(model) if config.compile else model, objective)
        if group.distributed:
            step = data_parallel(step, device)
    train_batches = hold_on_device(train_batches, device, log)
    if group.distributed:
        train_batches = RankBatches(train_batches, group)

    started, seconds_before = time.perf_counter(), state.seconds

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - started

    def snapshot() -> tuple[dict[str, torch.Tensor], dict]:
        """The full training state: tensors (weights, moments, RNG, best weights) and JSON."""
        tensors = training_tensors(trained, optimizer) | {f"best.{k}": v for k, v in best_weights.items()}
        state.seconds = elapsed()
        groups = [{k: v for k, v in g.items()} for g in optimizer.state_dict()["param_groups"]]
        json_state = {"loop": asdict(state), "param_groups": groups, "config": asdict(config)}
        if scaler.is_enabled():
            json_state["grad_scaler"] = scaler.state_dict()
        return tensors, json_state

    def checkpoint_now() -> tuple[dict[str, torch.Tensor], dict]:
        tensors, json_state = snapshot()
        if checkpoint_dir is not None and writes:
            try:
                save_checkpoint(checkpoint_dir, tensors, json_state)
            except OSError as err:  # e.g. disk full: the previous checkpoint stays intact
                log(f"warning: could not write a checkpoint ({err.strerror or err}); the previous one is kept")
        return tensors, json_state

    def stop(kind: str, reason: str) -> None:
        state.stop_kind, state.stop_reason = kind, reason

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss).backward()

    def forward_context():
        return autocast_to(device, precision)

    pending: list[tuple[int, str | torch.Tensor, torch.Tensor, dict]] = []  # steps taken but not yet settled

    def settle() -> bool:
        """Book the pending steps on the host, in order: the epoch's sums, and the count of non-finite steps in
        a row, which rolls the run back to the last good state after MAX_BAD_STEPS. True when it rolled back."""
        nonlocal state, best_weights, bad_steps
        steps = list(pending)
        pending.clear()
        for step_number, outcome, loss, stats in steps:
            if isinstance(outcome, torch.Tensor):  # deferred: the GPU's "all finite" flag
                outcome = STEP_TAKEN if bool(outcome) else STEP_BAD
            if outcome == STEP_BAD:
                bad_steps += 1  # the update was skipped: NaN never reaches the weights
                log(f"step {step_number}: non-finite loss or gradient, update skipped")
                if bad_steps >= MAX_BAD_STEPS:
                    if state.rollbacks >= MAX_ROLLBACKS:
                        raise TrainingDiverged(
                            f"loss or gradients non-finite for {bad_steps} steps in a row up to step "
                            f"{step_number}, even after {state.rollbacks} roll-back(s) with a lower learning rate"
                        )
                    state = _roll_back(last_good, trained, optimizer, state, log)
                    best_weights = _prefixed(last_good[0], "best.")
                    bad_steps = 0
                    return True
            elif outcome == STEP_TAKEN:
                bad_steps = 0
                state.epoch_loss_sum += float(loss)
                for name, value in stats.items():
                    state.epoch_stat_sums[name] = state.epoch_stat_sums.get(name, 0.0) + float(value)
                state.epoch_seen += 1
        return False

    last_good = snapshot()  # rolled back to after repeated non-finite steps
    clock = seconds_before  # training seconds as rank 0 counts them, agreed after every step
    bad_steps = 0
    micro_batches = 1  # doubled each time a step runs out of memory (see `accumulate`), halved again each epoch
    backbone_frozen = False
    last_checkpoint = time.perf_counter()
    with _stop_requests() as stop_requests, _progress(show_progress and writes) as progress:
        bar = progress.add_task("train", total=total_steps, completed=state.global_step, **_bar_fields(state, 0.0, "-"))
        first_step = state.global_step
        while not state.stop_kind:
            if state.epoch >= config.epochs:
                stop(STOP_EPOCHS, "finished all epochs")
                checkpoint_now()  # so that a resumed run knows it is done
                break
            budget_spent = bool(config.time_budget_s and elapsed() >= config.time_budget_s)
            if from_rank0(group, budget_spent) and state.step_in_epoch == 0:
                stop(STOP_TIME_BUDGET, f"time budget of {config.time_budget_s:g} s reached")
                checkpoint_now()  # spent during the last validation: no new epoch of one step
                break
            trained.train()
            epoch_started, rolled_back = time.perf_counter(), False
            if micro_batches > 1:  # the memory may have been short for a while only: try parts twice as large
                micro_batches //= 2
                log(f"epoch {state.epoch + 1}: trying {micro_batches} micro-batch(es) a step again")
            most_micro_batches = micro_batches
            for x, y in train_batches.epoch(state.epoch, start=state.step_in_epoch):
                progress_fraction = state.global_step / total_steps
                if config.time_budget_s:  # finish the schedule when the budget runs out (rank 0's clock)
                    progress_fraction = max(progress_fraction, clock / config.time_budget_s)
                state.lr = state.lr_scale * learning_rate(config, progress_fraction)
                frozen = progress_fraction < config.freeze_fraction
                if frozen != backbone_frozen:  # no gradients for a frozen backbone: no backward cost, no clipping share
                    set_backbone_frozen(optimizer, frozen)
                    backbone_frozen = frozen
                for group_settings in optimizer.param_groups:
                    group_settings["lr"] = group_learning_rate(config, group_settings, state.lr, progress_fraction)
                x, y = to_device(x, device, channels_last), to_device(y, device)
                while True:
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        loss, stats = accumulate(step, x, y, micro_batches, backward, forward_context)
                        break
                    except torch.OutOfMemoryError:
                        # Under DDP the other ranks are already inside this step's all-reduces: a retry on one
                        # rank alone would pair its gradients with theirs wrongly. The run stops (--resume).
                        if micro_batches >= count_examples(x) or group.distributed:
                            raise
                    # Out of the except block, so that the error's frames (and the tensors they hold) are gone.
                    optimizer.zero_grad(set_to_none=True)
                    release_memory(device)
                    micro_batches *= 2
                    most_micro_batches = max(most_micro_batches, micro_batches)
                    log(
                        f"step {state.global_step}: out of {device.type} memory with {count_examples(x)} examples at "
                        f"once; retrying as {micro_batches} micro-batches whose gradients add up to one step"
                    )
                scaler.unscale_(optimizer)
                grad_norm = whole(nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip))
                checkpoint_due = time.perf_counter() - last_checkpoint >= config.checkpoint_every_s
                # Every rank takes the same decisions: on the mean loss, rank 0's clock (the schedule and
                # the time budget) and any rank's stop request.
                loss, clock, (signalled, checkpoint_due) = agree(
                    group, loss, elapsed(), [bool(stop_requests), checkpoint_due]
                )
                time_up = bool(config.time_budget_s and clock >= config.time_budget_s)
                outcome = _apply_gradients(optimizer, scaler, loss, grad_norm, deferred)
                pending.append((state.global_step, outcome, loss, stats))
                state.step_in_epoch += 1
                state.global_step += 1
                if not deferred or signalled or time_up or checkpoint_due or len(pending) >= SETTLE_EVERY:
                    rolled_back = settle()
                    if rolled_back:
                        break
                eta = _eta(state, total_steps, first_step, time.perf_counter() - started, config, elapsed())
                rate = state.epoch_seen / max(time.perf_counter() - epoch_started, 1e-9)
                progress.update(bar, completed=state.global_step, **_bar_fields(state, rate, eta))
                if signalled:
                    checkpoint_now()
                    raise TrainingInterrupted(f"stopped by signal at step {state.global_step}; checkpoint written")
                if time_up:
                    stop(STOP_TIME_BUDGET, f"time budget of {config.time_budget_s:g} s reached")
                    break
                if checkpoint_due:
                    last_good = checkpoint_now()
                    last_checkpoint = time.perf_counter()
            rolled_back = rolled_back or settle()  # the epoch's last steps
            if rolled_back:
                continue

            # Rank 0 validates the plain network (no collective inside); the others take its numbers.
            if sharded:
                gather(trained, model)
            val_metrics = from_rank0(group, objective.evaluate(model, val_batches) if writes else None)
            if not math.isfinite(score(objective, val_metrics)):
                raise TrainingDiverged(f"validation {objective.monitor} is not finite after epoch {state.epoch + 1}")
            seen = max(state.epoch_seen, 1)
            record = {"epoch": state.epoch + 1, "step": state.global_step, "train_loss": state.epoch_loss_sum / seen}
            record |= {f"train_{name}": total / seen for name, total in state.epoch_stat_sums.items()}
            record |= {f"val_{name}": value for name, value in val_metrics.items()}
            record |= {"lr": state.lr, "seconds": round(elapsed(), 2)}
            if most_micro_batches > 1:  # the device's memory did not hold a whole batch at once
                record["micro_batches"] = most_micro_batches
            state.history.append(record)
            if out_dir is not None and writes:
                with open(out_dir / "history.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            epoch_score = score(objective, val_metrics)
            if epoch_score > state.best_score:
                state.best_score, state.best_epoch, state.bad_epochs = epoch_score, state.epoch + 1, 0
                state.best_step = state.global_step
                best_weights = _cpu_copy(model.state_dict())
            else:
                state.bad_epochs += 1
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            state.epoch_loss_sum, state.epoch_stat_sums, state.epoch_seen = 0.0, {}, 0
            steps_since_best = state.global_step - state.best_step
            if state.bad_epochs >= config.patience and steps_since_best >= config.patience_min_steps:
                if not state.stop_kind:
                    stop(
                        STOP_EARLY,
                        f"early stopping: no better validation {objective.monitor} for {state.bad_epochs} epochs "
                        f"({steps_since_best} steps)",
                    )
            if not state.stop_kind and state.epoch >= config.epochs:
                stop(STOP_EPOCHS, "finished all epochs")
            last_good = checkpoint_now()
            last_checkpoint = time.perf_counter()
            if from_rank0(group, bool(stop_requests)):  # Ctrl-C during validation: the epoch is complete
                raise TrainingInterrupted(f"stopped by signal after epoch {state.epoch}; checkpoint written")

    set_backbone_frozen(optimizer, False)
    model.load_state_dict(best_weights)
    return TrainResult(
        state.history, state.best_epoch, state.best_score, state.stop_reason, elapsed(), state.global_step
    )


STEP_TAKEN, STEP_OVERFLOW, STEP_BAD = "taken", "overflow", "bad"


def _apply_gradients(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss, grad_norm, deferred: bool = False
) -> str | torch.Tensor:
    """Step the optimizer unless the step is not finite, and close the scaler's step on every path.

    STEP_TAKEN: an update. STEP_OVERFLOW (fp16 only): the gradients overflowed; the scaler skips the update
    and lowers its scale, which is routine, not divergence. STEP_BAD: a non-finite loss (or gradients outside
    fp16): nothing reaches the weights, and the loop counts it.
    `deferred` (a fused optimizer, no loss scaling): the check stays on the device, where the fused kernel skips
    a non-finite step through `found_inf` (the attribute GradScaler sets for the same purpose); the return value
    is the device's "all finite" flag, read when the loop settles the step.
    """
    if deferred:
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        return finite
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        outcome = STEP_TAKEN
    elif scaler.is_enabled() and torch.isfinite(loss):
        outcome = STEP_OVERFLOW
    else:
        outcome = STEP_BAD
    if outcome != STEP_BAD:
        scaler.step(optimizer)  # an overflow is skipped inside: the scaler saw the inf gradients in unscale_
    scaler.update()  # after every unscale_: adjusts the scale, and the next step may unscale again
    return outcome


@torch.no_grad()
def gather(sharded: nn.Module, model: nn.Module) -> None:
    """Copy a sharded network's weights, whole, into its unsharded twin `model`, one tensor at a time (every rank
    takes part in each gather)."""
    into = model.state_dict()
    for name, value in sharded.state_dict().items():
        into[name].copy_(whole(value))


def _cpu_copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: cpu_copy(v) for k, v in weights.items()}


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _roll_back(last_good, model: nn.Module, optimizer: torch.optim.Optimizer, state: LoopState, log) -> LoopState:
    """Return to the last good snapshot with a tenth of the learning rate."""
    tensors, json_state = last_good
    restore_training_tensors(Checkpoint(Path("memory"), json_state, tensors), model, optimizer)
    restored = LoopState.from_json(json_state["loop"])
    restored.lr_scale = state.lr_scale * ROLLBACK_LR_FACTOR
    restored.rollbacks = state.rollbacks + 1
    log(
        f"step {state.global_step}: {MAX_BAD_STEPS} non-finite steps in a row; rolled back to step "
        f"{restored.global_step} with the learning rate scaled by {restored.lr_scale:g}"
    )
    return restored


def _eta(
    state: LoopState, total_steps: int, first_step: int, run_seconds: float, config: TrainConfig, elapsed: float
) -> str:
    done = state.global_step - first_step
    if done <= 0:
        return "-"
    seconds = (total_steps - state.global_step) * run_seconds / done
    if config.time_budget_s:
        seconds = min(seconds, config.time_budget_s - elapsed)
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _bar_fields(state: LoopState, rate: float, eta: str) -> dict:
    seen = max(state.epoch_seen, 1)
    stats = f"loss {state.epoch_loss_sum / seen:.3f}"
    stats += "".join(f"  {name} {total / seen:.3f}" for name, total in state.epoch_stat_sums.items())
    return {"epoch": state.epoch + 1, "stats": stats, "rate": rate, "eta": eta}
