"""The one training loop: AdamW, warmup + cosine, mixed precision, early stopping, checkpoints.

Read top to bottom in `train()`. Everything it needs comes in as arguments; everything it learned
goes out in the `TrainResult` (and, when `out_dir` is given, history.jsonl and checkpoints/).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from layerwise.errors import InputError
from layerwise.train.batches import TensorBatches
from layerwise.train.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    restore_training_tensors,
    save_checkpoint,
    training_tensors,
)

MAX_BAD_STEPS = 20  # consecutive non-finite steps before giving up
BEST_WEIGHTS = "best.safetensors"  # inside checkpoints/: the best weights so far


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3  # peak learning rate of AdamW
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # of the whole run, linear warmup before the cosine decay
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    patience: int = 6  # epochs without a better validation accuracy before stopping early
    time_budget_s: float | None = None  # stop cleanly (keeping the best model) after this many seconds
    seed: int = 0
    mixed_precision: bool = True  # bf16 autocast where the hardware supports it
    checkpoint_every_s: float = 300.0  # also checkpoint mid-epoch at most this often
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, not {self.batch_size}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise InputError(f"--time-budget must be positive, not {self.time_budget_s}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"warmup fraction must be in [0, 1), not {self.warmup_fraction}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_accuracy: float = -1.0
    stop_reason: str = "finished all epochs"
    seconds: float = 0.0
    global_step: int = 0


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite; the message says since which step."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first so `--resume` can continue."""


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


def learning_rate(config: TrainConfig, progress: float) -> float:
    """Linear warmup to `config.lr`, then cosine decay to 1% of it. `progress` in [0, 1]."""
    if progress < config.warmup_fraction:
        return config.lr * progress / config.warmup_fraction
    decay = (progress - config.warmup_fraction) / (1 - config.warmup_fraction)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, decay))))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases, norms and embeddings (1-D or position tables) get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or "positions" in name or "embed" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=False)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    if device.type == "cpu" and _has_conv(model):
        model.to(memory_format=torch.channels_last)  # oneDNN convolutions are faster in NHWC
    return model


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches, device: torch.device | None = None, mixed_precision: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, classes) in float32 and labels (N,) for every batch of epoch 0, in order."""
    device = device or next(model.parameters()).device
    channels_last = device.type == "cpu" and _has_conv(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches.epoch(0):
        with autocast_for(device, mixed_precision):
            logits.append(model(_to_device(x, device, channels_last)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


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
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  {task.fields[rate]:.0f} ex/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train(
    model: nn.Module,
    train_batches: TensorBatches,
    val_batches: TensorBatches,
    config: TrainConfig,
    out_dir: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log=print,
) -> TrainResult:
    """Fit `model` on `train_batches`, keeping the weights with the best validation accuracy.

    With `out_dir`: appends one line per epoch to out_dir/history.jsonl and writes resumable
    checkpoints to out_dir/checkpoints/. With `resume=True`: continues from the newest good one.
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = prepare_model(model, device)
    channels_last = device.type == "cpu" and _has_conv(model)
    optimizer = make_optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    steps_per_epoch = len(train_batches)
    total_steps = config.epochs * steps_per_epoch
    checkpoint_dir = out_dir / "checkpoints" if out_dir else None

    result = TrainResult()
    epoch, step_in_epoch, bad_epochs, elapsed_before = 0, 0, 0, 0.0
    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume:
        checkpoint = load_latest_checkpoint(checkpoint_dir, warn=log)
        restore_training_tensors(checkpoint, model, optimizer)
        s = checkpoint.state
        epoch, step_in_epoch, bad_epochs, elapsed_before = s["epoch"], s["step_in_epoch"], s["bad_epochs"], s["seconds"]
        result = TrainResult(history=s["history"], best_epoch=s["best_epoch"], best_accuracy=s["best_accuracy"])
        result.global_step = s["global_step"]
        if (checkpoint_dir / BEST_WEIGHTS).exists():
            best_weights = load_file(str(checkpoint_dir / BEST_WEIGHTS))
        log(f"resuming from {checkpoint.path.name}: epoch {epoch + 1}, step {step_in_epoch}")
    elif checkpoint_dir is not None and list_checkpoints(checkpoint_dir):
        raise InputError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
    if out_dir is not None:  # history.jsonl holds exactly the epochs the (restored) state has seen
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in result.history))

    def state_json() -> dict:
        return {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": result.global_step,
            "bad_epochs": bad_epochs, "best_epoch": result.best_epoch, "best_accuracy": result.best_accuracy,
            "seconds": elapsed(), "history": result.history, "config": asdict(config),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                             for g in optimizer.state_dict()["param_groups"]],
        }  # fmt: skip

    def checkpoint_now() -> None:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, training_tensors(model, optimizer), state_json())

    started = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    stop = False
    last_checkpoint = time.perf_counter()
    bad_steps = 0
    with _stop_requests() as stop_requests, _progress(show_progress) as progress:
        bar = progress.add_task("train", total=total_steps, completed=result.global_step, epoch=epoch + 1, loss=0.0, acc=0.0, rate=0.0)
        while epoch < config.epochs and not stop:
            model.train()
            loss_sum, correct, seen, epoch_started = 0.0, 0, 0, time.perf_counter()
            for x, y in train_batches.epoch(epoch, start=step_in_epoch):
                progress_fraction = result.global_step / total_steps
                if config.time_budget_s:  # finish the schedule when the budget runs out
                    progress_fraction = max(progress_fraction, elapsed() / config.time_budget_s)
                lr = learning_rate(config, progress_fraction)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = _to_device(x, device, channels_last), y.to(device)
                with autocast_for(device, config.mixed_precision):
                    logits = model(x)
                    loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    bad_steps += 1  # skip the update: NaN must never reach the weights
                    log(f"step {result.global_step}: non-finite loss or gradient, update skipped")
                    if bad_steps >= MAX_BAD_STEPS:
                        raise TrainingDiverged(f"loss stayed non-finite for {bad_steps} steps, up to step {result.global_step}")
                else:
                    bad_steps = 0
                    optimizer.step()
                step_in_epoch += 1
                result.global_step += 1
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                rate = seen / max(time.perf_counter() - epoch_started, 1e-9)
                progress.update(bar, advance=1, epoch=epoch + 1, loss=loss_sum / seen, acc=correct / seen, rate=rate)
                if stop_requests:
                    checkpoint_now()
                    raise TrainingInterrupted(f"stopped by signal at step {result.global_step}; checkpoint written")
                if config.time_budget_s and elapsed() >= config.time_budget_s:
                    stop, result.stop_reason = True, f"time budget of {config.time_budget_s:g} s reached"
                    break
                if time.perf_counter() - last_checkpoint >= config.checkpoint_every_s:
                    checkpoint_now()
                    last_checkpoint = time.perf_counter()

            val_logits, val_labels = predict_logits(model, val_batches, device, config.mixed_precision)
            val_loss = float(nn.functional.cross_entropy(val_logits, val_labels))
            val_accuracy = float((val_logits.argmax(1) == val_labels).float().mean())
            record = {
                "epoch": epoch + 1, "step": result.global_step,
                "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": lr, "seconds": round(elapsed(), 2),
            }  # fmt: skip
            result.history.append(record)
            if out_dir is not None:
                with open(out_dir / "history.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if val_accuracy > result.best_accuracy:
                result.best_accuracy, result.best_epoch, bad_epochs = val_accuracy, epoch + 1, 0
                best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if checkpoint_dir is not None:
                    checkpoint_dir.mkdir(parents=True, exist_ok=True)
                    save_file({k: v.contiguous() for k, v in best_weights.items()}, str(checkpoint_dir / BEST_WEIGHTS))
            else:
                bad_epochs += 1
            epoch, step_in_epoch = epoch + 1, 0
            checkpoint_now()
            last_checkpoint = time.perf_counter()
            if bad_epochs >= config.patience and not stop:
                stop, result.stop_reason = True, f"early stopping: no better validation accuracy for {bad_epochs} epochs"

    model.load_state_dict(best_weights)
    result.seconds = elapsed()
    return result
