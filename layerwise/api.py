"""`layerwise.fit`: from raw files to a trained, saved, reported model, for any task.

Each step is a small function; `fit` reads as the list of steps. What differs between tasks comes
from the task's `prepare` and its methods; nothing here asks which task it is.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from layerwise import __version__
from layerwise.bundle import CONFIG_FILE, FORMAT_VERSION, Model, load
from layerwise.curve import CURVE_FILE, read_finished_curve
from layerwise.data.sources import Problem
from layerwise.errors import InputError
from layerwise.files import write_atomic, write_json
from layerwise.models.registry import create_model, load_pretrained
from layerwise.runtime import resolve_device, resolve_precision
from layerwise.tasks import detect_task, task_class
from layerwise.tasks.base import FitOptions, RunMismatch
from layerwise.training.checkpoint import Checkpoint, CheckpointError, list_checkpoints, load_latest_checkpoint
from layerwise.training.distributed import STRATEGIES, device_for, process_group_from_env
from layerwise.training.loop import LoopState, TrainConfig, stage_depths, train
from layerwise.training.memory import MIN_STEPS_PER_EPOCH, BatchSearch, bytes_to_hold, largest_batch

__all__ = ["fit", "load"]

RUN_OUTPUTS = ("config.json", "model.safetensors", "metrics.json", "report.html")
console = Console(stderr=True)


def say(message: str) -> None:
    """A progress message on stderr, never wrapped mid-path."""
    console.print(message, soft_wrap=True, highlight=False, markup=False)


def quiet(message: str) -> None:
    """The messages of ranks other than 0, which would repeat rank 0's."""


@dataclass(frozen=True)
class Settings:
    """Every option of a run. A resumed run keeps the fixed ones and may change the adjustable ones."""

    task: str | None = None
    modality: str | None = None
    model: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    batch_size: int | None = None
    lr: float | None = None  # None: the task's default (Prepared.lr)
    epochs: int = 30  # adjustable on --resume, like the two below
    time_budget: float | None = None
    checkpoint_every: float = 300.0
    device: str = "auto"  # where and how to train: adjustable on --resume (a checkpoint moves between them)
    precision: str = "auto"
    compile: bool = False
    strategy: str = "ddp"  # over several processes: DDP or FSDP (adjustable on --resume: checkpoints are whole)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 0.5:
            raise InputError(f"--val-fraction must be between 0 and 0.5, not {self.val_fraction}")
        # Checked here too (TrainConfig checks again) so that bad options fail before the data is read.
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, not {self.epochs}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise InputError(f"--time-budget must be positive, not {self.time_budget}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy {self.strategy}: choose one of {', '.join(STRATEGIES)}")


FIXED_ON_RESUME = ("task", "modality", "model", "seed", "val_fraction", "batch_size", "lr")
ADJUSTABLE_ON_RESUME = ("epochs", "time_budget", "checkpoint_every", "device", "precision", "compile", "strategy")


def fit(
    data: str | Path,
    out: str | Path | None = None,
    *,
    task: str | None = None,
    modality: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    time_budget: float | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    init: str | Path | None = None,
    freeze_fraction: float | None = None,
    layer_decay: float | None = None,
    resume: bool = False,
    checkpoint_every: float | None = None,
    device: str | None = None,
    precision: str | None = None,
    compile: bool | None = None,
    strategy: str | None = None,
    curve: str | Path | None = None,
    show_progress: bool = True,
) -> Model:
    """Train on raw files under `data`; write the run directory `out` if given.

    Options left as None take their defaults, or, with `resume=True`, the saved run's values.
    Started by torchrun (WORLD_SIZE > 1), every process trains and rank 0 alone writes the run; the
    other ranks return the trained network without metrics. `curve`: a `layerwise curve` folder made on
    this data, shown in the run's report (classification).
    """
    started = time.perf_counter()
    group = process_group_from_env()
    log = say if group.writes_run else quiet
    given = {
        "task": task, "modality": modality, "model": model, "seed": seed, "val_fraction": val_fraction,
        "batch_size": batch_size, "lr": lr, "epochs": epochs, "time_budget": time_budget,
        "checkpoint_every": checkpoint_every, "device": device, "precision": precision, "compile": compile,
        "strategy": strategy,
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    run_dir = Path(out) if out is not None else None
    saved = saved_config(run_dir) if resume else None
    if saved is None:
        if run_dir is not None and group.writes_run:
            refuse_existing_run(run_dir)  # before anything is written
        settings = Settings(**given)
    else:
        settings = resumed_settings(saved, given, log)
        if init is not None:
            log("note: --init is ignored on --resume; the run continues from its own checkpoint")
            init = None
    resolve_precision(settings.precision, resolve_device(device_for(group, settings.device)))  # fail before any work
    learning_curve = read_finished_curve(curve) if curve is not None else None
    if learning_curve is None and saved is not None and (run_dir / CURVE_FILE).is_file():
        learning_curve = read_finished_curve(run_dir / CURVE_FILE)  # a resumed run keeps the curve it was given
    if run_dir is not None and group.writes_run:
        check_writable(run_dir)
    seed_everything(settings.seed)

    task_type = task_class(settings.task or detect_task(Path(data)))
    if learning_curve is not None and not getattr(task_type, "learning_curves", False):
        raise InputError(f"--curve: learning curves are made for classification, not for {task_type.name} runs")
    donor = load(init) if init is not None else None
    if donor is not None:
        check_donor(donor, task_type, Path(init))
    options = FitOptions(
        settings.modality, settings.model, settings.seed, settings.val_fraction, settings.batch_size,
        settings.time_budget,
    )  # fmt: skip
    prepared = task_type.prepare(Path(data), options, saved=saved, donor=donor, log=log)
    if group.writes_run:
        report_problems(prepared.problems)
    network = create_model(prepared.model_name, **prepared.model_config)
    fresh: tuple[str, ...] = ()  # backbone parameters a transfer leaves at random values
    approach = saved.get("approach", "from scratch") if saved is not None else "from scratch"
    if donor is None and (saved is None or not list_checkpoints(run_dir / "checkpoints")):
        # A new run of a model with published weights starts from them (a resumed one from its checkpoint).
        pretrained = load_pretrained(prepared.model_name, network)
        if pretrained is not None:
            log(pretrained)
            approach = f"fine-tuned from {prepared.model_name}'s published weights"
    if donor is not None:
        if donor.task.modality != prepared.task.modality:
            raise InputError(
                f"--init {init}: that run learned from {donor.task.modality}, this data is "
                f"{prepared.task.modality}; give a run of the same modality"
            )
        fresh = transfer_weights(network, donor, prepared.task, Path(init))
        kind = getattr(donor.task, "transfer_kind", "transferred")
        approach = f"{kind} in {Path(init).name}, then fine-tuned"
    schedule = transfer_schedule(saved, approach != "from scratch", freeze_fraction, layer_decay, fresh)
    lr = settings.lr or prepared.lr
    batch_search = None
    if approach == "from scratch":  # a transfer keeps the batch (and learning rate) its recipe was tuned for
        batch_search = search_batch_size(network, prepared, settings, saved, group)
    if batch_search is not None and batch_search.chosen != prepared.batch_size:
        prepared.train_batches, prepared.batch_size = prepared.batches_of(batch_search.chosen), batch_search.chosen
        lr = settings.lr or batch_search.lr_for(prepared.lr)
        why = (
            f"the largest that leaves an epoch {MIN_STEPS_PER_EPOCH}+ steps, and it fits {batch_search.device}"
            if batch_search.chosen == batch_search.limit
            else f"the largest that fits {batch_search.device}"
        )
        scaled = "as given" if settings.lr else f"scaled from {prepared.lr:.2g} at batch {batch_search.start}"
        log(f"batch size {batch_search.chosen} ({why}); learning rate {lr:.2g} ({scaled})")
    config = TrainConfig(
        epochs=settings.epochs, batch_size=prepared.batch_size, lr=lr,
        time_budget_s=settings.time_budget,
        seed=settings.seed, checkpoint_every_s=settings.checkpoint_every,
        device=settings.device, precision=settings.precision, compile=settings.compile, strategy=settings.strategy,
        **({"patience": prepared.patience} if prepared.patience else {}), **schedule,
    )  # fmt: skip
    run_config = {
        "format": FORMAT_VERSION, "layerwise_version": __version__, "task": prepared.task.name,
        **prepared.task.to_json(), "model": {"name": prepared.model_name, "config": prepared.model_config},
        "approach": approach,
        "train": asdict(config), "data": prepared.data_summary,
    }  # fmt: skip
    if batch_search is not None:
        run_config["batch_search"] = batch_search.to_json()
    elif saved is not None and "batch_search" in saved:  # a resumed run keeps the record of how its batch was chosen
        run_config["batch_search"] = saved["batch_search"]
    checkpoint = None
    if saved is not None:
        checkpoint = resumable_checkpoint(run_dir, log)  # every rank reads it; rank 0 alone speaks
        if checkpoint is not None and finished(checkpoint, config) and outputs_match(run_dir, checkpoint):
            log(f"{run_dir}: the run has already finished ({checkpoint.state['loop']['stop_reason']}); nothing to do")
            return load_finished(run_dir)
    if run_dir is not None and group.writes_run:
        # A resumed run's model.safetensors and metrics.json stay the saved run's until it ends, so its config keeps
        # the model and task settings fitted after that run's training (a detector's inference side and views, a
        # temperature) and takes the new training settings and data record: killed midway, it loads as it was.
        on_disk = (
            run_config if saved is None else saved | {k: run_config[k] for k in ("layerwise_version", "train", "data")}
        )
        write_json(run_dir / CONFIG_FILE, on_disk)
        write_json(run_dir / "problems.json", {"skipped": [p.to_json() for p in prepared.problems]})
    n_params = sum(p.numel() for p in network.parameters())
    processes = f", {group.world_size} processes" if group.distributed else ""
    if group.writes_run:
        console.print(
            f"model [bold]{prepared.model_name}[/] ({n_params:,} parameters), "
            f"{prepared.data_summary['n_train']} train / {prepared.data_summary['n_val']} validation, "
            f"batch {prepared.batch_size}{processes}"
        )
    result = train(  # the processes leave their group when it returns: what follows is rank 0's alone
        network, prepared.train_batches, prepared.val_batches, config, out_dir=run_dir,
        resume=checkpoint or False, show_progress=show_progress, log=log, objective=prepared.task,
    )  # fmt: skip
    bundle = Model(network, prepared.task, run_config)
    if not group.writes_run:
        return bundle

    metrics = prepared.task.final_metrics(network, prepared)
    calibrate = getattr(prepared.task, "calibrate", None)  # optional: temperature, shift reference
    if calibrate is not None:
        calibrate(network, prepared, log=log)
        run_config.update(prepared.task.to_json())
    # final_metrics may fit the model config on the validation split (a detector's inference side). run_config
    # holds that same dict already; set again so that the saved config never rests on the aliasing.
    run_config["model"]["config"] = prepared.model_config
    baseline = prepared.task.baseline(prepared, settings.seed)
    summary = {
        "metrics": metrics,
        "baseline": baseline,
        "approach": approach,
        "verdict": prepared.task.verdict(metrics, baseline, approach),
        "split": prepared.extras.get("split", ""),
        "model": prepared.model_name, "parameters": n_params, "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "stop_reason": result.stop_reason, "steps": result.global_step,
        "train_seconds": round(result.seconds, 1),
        "decode_seconds": round(prepared.extras.get("decode_seconds", 0.0), 1),
        "total_seconds": round(time.perf_counter() - started, 1), "n_skipped": len(prepared.problems),
        "device": str(next(network.parameters()).device), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "processes": group.world_size, **({"strategy": config.strategy} if group.distributed else {}),
    }  # fmt: skip
    if learning_curve is not None:
        learning_curve = matched_curve(learning_curve, prepared.data_summary, log)
        summary["learning_curve"] = learning_curve["verdict"]
    if run_dir is not None:
        bundle.save(run_dir)
        if learning_curve is not None:
            write_json(run_dir / CURVE_FILE, learning_curve)  # the report reads it from the run
        for name, content in getattr(prepared.task, "run_files", dict)().items():
            write_atomic(run_dir / name, content)
        prepared.task.write_report(run_dir, bundle, summary, result, prepared, log=log)
        write_json(run_dir / "metrics.json", summary)  # last: its "steps" marks the run files as complete
    bundle.summary = summary
    return bundle


def search_batch_size(network, prepared, settings: Settings, saved: dict | None, group) -> BatchSearch | None:
    """On a GPU, for a new single-process run whose batch size the user left open: the largest batch that fits
    (`training.memory.largest_batch`), beside the training data when it will be held there. A resumed run keeps
    the batch it started with; under torchrun every rank takes its part of the global batch, which --batch-size
    sets; a task without `batches_of` (text generation: its epochs are windows drawn at random) keeps its own."""
    if settings.batch_size is not None or saved is not None or prepared.batches_of is None or group.distributed:
        return None
    device = resolve_device(settings.device)
    if device.type != "cuda":
        return None
    precision = resolve_precision(settings.precision, device)
    n_train = int(prepared.data_summary.get("n_train", 0))
    held = bytes_to_hold(prepared.train_batches, device)  # the training data the loop will copy to the GPU
    return largest_batch(
        network, prepared.task, prepared.batches_of, prepared.batch_size, n_train, device, precision, held
    )  # fmt: skip


def matched_curve(curve: dict, data_summary: dict, log) -> dict:
    """The curve, with a note in its report section when it was measured on other data than this run's."""
    if curve["data"].get("fingerprint") == data_summary["fingerprint"]:
        return curve
    note = (
        f"this learning curve was measured on {curve['data'].get('source')} ({curve['data'].get('n_train')} "
        f"training examples), not on exactly this run's data and split"
    )
    log(f"note: --curve: {note}")
    return curve | {"notes": [*curve.get("notes", []), note[0].upper() + note[1:] + "."]}


def saved_config(run_dir: Path | None) -> dict:
    """RUN/config.json of the run to resume."""
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        raise InputError(f"--resume: {run_dir} holds no run to resume (no config.json)")
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--resume: {run_dir / CONFIG_FILE} is not valid JSON ({err})") from err


def resumed_settings(saved: dict, given: dict, log=say) -> Settings:
    """The saved run's settings, with the adjustable ones the user gave; a changed fixed one is refused."""
    train_config, data = saved["train"], saved["data"]
    settings = Settings(
        task=saved.get("task", "classify"), modality=saved["modality"], model=saved["model"]["name"],
        seed=train_config["seed"], val_fraction=data["val_fraction"], batch_size=train_config["batch_size"],
        lr=train_config["lr"], epochs=train_config["epochs"], time_budget=train_config["time_budget_s"],
        checkpoint_every=train_config["checkpoint_every_s"], device=train_config.get("device", "auto"),
        precision=train_config.get("precision", "auto"), compile=train_config.get("compile", False),
        strategy=train_config.get("strategy", "ddp"),
    )  # fmt: skip
    changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != getattr(settings, k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run has {getattr(settings, k)})" for k in changed)
        raise RunMismatch(
            f"--resume: {flags}. A resumed run keeps its task, modality, model, seed, split, batch size and "
            "learning rate; only --epochs, --time-budget, --checkpoint-every, --device, --precision, --compile "
            "and --strategy may change"
        )
    adjusted = {k: given[k] for k in ADJUSTABLE_ON_RESUME if k in given and given[k] != getattr(settings, k)}
    kept = ", ".join(f"{k} {getattr(settings, k)}" for k in FIXED_ON_RESUME if getattr(settings, k) is not None)
    log(f"resuming with the saved settings: {kept}")
    for k, v in adjusted.items():
        log(f"  {k.replace('_', ' ')}: {v} (was {getattr(settings, k)})")
    return replace(settings, **adjusted)


def refuse_existing_run(run_dir: Path) -> None:
    """Training into a directory that holds a run needs --resume; nothing is touched before this check."""
    if (
        (run_dir / CONFIG_FILE).is_file()
        or (run_dir / "model.safetensors").is_file()
        or list_checkpoints(run_dir / "checkpoints")
    ):
        raise InputError(
            f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )


def resumable_checkpoint(run_dir: Path, log=say) -> Checkpoint | None:
    """The newest good checkpoint; None when the run stopped before writing one (it then starts over)."""
    if not list_checkpoints(run_dir / "checkpoints"):
        log(f"{run_dir}: no checkpoint was written before the run stopped; training from the start")
        return None
    try:
        return load_latest_checkpoint(run_dir / "checkpoints", warn=log)
    except CheckpointError as err:
        raise InputError(f"--resume: {err}; train again into a new --out") from err


def finished(checkpoint: Checkpoint, config: TrainConfig) -> bool:
    return LoopState.from_json(checkpoint.state["loop"]).finished_under(config)


def outputs_match(run_dir: Path, checkpoint: Checkpoint) -> bool:
    """All run files are there and were written after the checkpoint's last step (not by an earlier stop)."""
    if not all((run_dir / name).is_file() for name in RUN_OUTPUTS):
        return False
    try:
        summary = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("steps") == checkpoint.state["loop"]["global_step"]


def load_finished(run_dir: Path) -> Model:
    bundle = load(run_dir)
    bundle.summary = json.loads((run_dir / "metrics.json").read_text())
    return bundle


def check_writable(run_dir: Path) -> None:
    """Fail before any work when the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise InputError(f"--out {run_dir}: cannot write there ({err.strerror})") from err


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def report_problems(problems: list[Problem], shown: int = 20) -> None:
    if not problems:
        return
    console.print(f"[yellow]skipped {len(problems)} unusable input(s):[/]")
    for problem in problems[:shown]:
        console.print(f"  {problem.origin}: {problem.reason}", markup=False, highlight=False, soft_wrap=True)
    if len(problems) > shown:
        console.print(f"  ... and {len(problems) - shown} more (all listed in problems.json)")


TRANSFER_FREEZE_FRACTION = 0.1  # of the run, the transferred backbone stays fixed while the new head learns
TRANSFER_LAYER_DECAY = 0.75  # each earlier stage learns at this fraction of the next one's rate


def check_donor(donor: Model, task_type: type, init_run: Path) -> None:
    """Which runs may start which: one of the same task, a run whose task starts any task of its modality
    (`layerwise pretrain`), or one of the tasks the task names in `init_from` (detect: an image classifier)."""
    accepted = (task_type.name, *getattr(task_type, "init_from", ()))
    if donor.task.name in accepted or getattr(donor.task, "starts_any_task", False):
        return
    raise InputError(
        f"--init {init_run}: a {donor.task.name} run cannot start a {task_type.name} run (their networks share "
        f"no backbone); give a {' or '.join(accepted)} run, or a `layerwise pretrain` run"
    )


def transfer_schedule(
    saved: dict | None,
    transferring: bool,
    freeze_fraction: float | None,
    layer_decay: float | None,
    fresh: tuple[str, ...] = (),
) -> dict:
    """freeze_fraction, layer_decay and fresh_parameters for TrainConfig: the saved ones on --resume (the
    schedule continues exactly), the transfer defaults with --init, else none (or what the user asked for)."""
    if saved is not None:
        if freeze_fraction is not None or layer_decay is not None:
            say("note: --freeze-fraction and --layer-decay are ignored on --resume; the run keeps its schedule")
        train_config = saved["train"]
        kept = {k: train_config[k] for k in ("freeze_fraction", "layer_decay") if k in train_config}
        return kept | ({"fresh_parameters": tuple(train_config["fresh_parameters"])} if train_config.get(
            "fresh_parameters") else {})  # fmt: skip
    defaults = (TRANSFER_FREEZE_FRACTION, TRANSFER_LAYER_DECAY) if transferring else (0.0, 1.0)
    chosen = (
        defaults[0] if freeze_fraction is None else freeze_fraction,
        defaults[1] if layer_decay is None else layer_decay,
    )
    return {"freeze_fraction": chosen[0], "layer_decay": chosen[1]} | ({"fresh_parameters": fresh} if fresh else {})


def donor_tensor_names(network: torch.nn.Module, donor: torch.nn.Module) -> dict[str, str]:
    """Donor tensor name -> this network's name for the same tensor: equal names, and inside stages of the
    same name wherever they sit (a classifier's `stages.0.conv.weight` is a detector's
    `backbone.stages.0.conv.weight`)."""
    names = {name: name for name in donor.state_dict()}
    own_prefix = module_prefixes(network)
    for stage, prefix in module_prefixes(donor).items():
        if stage in own_prefix and own_prefix[stage] != prefix:
            for name in donor.state_dict():
                if name.startswith(prefix + "."):
                    names[name] = own_prefix[stage] + name[len(prefix) :]
    return names


def module_prefixes(network: torch.nn.Module) -> dict[str, str]:
    """Stage name -> the stage module's path in the network (for models with `named_stages`)."""
    named_stages = getattr(network, "named_stages", None)
    if named_stages is None:
        return {}
    paths = {id(module): path for path, module in network.named_modules()}
    return {name: paths[id(module)] for name, module in named_stages() if id(module) in paths}


def transfer_weights(network: torch.nn.Module, donor: Model, own_task, init_run: Path) -> tuple[str, ...]:
    """Start from another run's weights wherever names and shapes match (the head usually won't).

    Token embeddings are copied only when both runs share the tokenizer: rows of two different
    vocabularies mean different tokens even when the shapes agree. Returns the backbone parameters (inside
    the stages a transfer schedule freezes) that were not filled, so that the schedule does not freeze them.
    """
    own = network.state_dict()
    renamed = donor_tensor_names(network, donor.network)
    matched, differ = {}, []
    for name, tensor in donor.network.state_dict().items():
        target = renamed[name]
        if target in own and own[target].shape == tensor.shape:
            matched[target] = tensor
        elif target in own:
            differ.append(f"{target} {tuple(tensor.shape)} there, {tuple(own[target].shape)} here")
    donor_vocab = donor.config["model"]["config"].get("vocab_size")
    if donor_vocab is not None and tokenizer_of(donor.task) != tokenizer_of(own_task):
        tables = sorted(k for k, v in matched.items() if v.ndim == 2 and v.shape[0] == donor_vocab)
        for name in tables:
            del matched[name]
        if tables:
            say(f"--init: not copying {', '.join(tables)}: the two runs have different tokenizers")
    # Counters such as BatchNorm's num_batches_tracked are copied along but carry no features of their own.
    if not any(tensor.is_floating_point() for tensor in matched.values()):
        shapes = f"; shapes differ: {'; '.join(differ[:3])}" + (
            f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        )
        raise InputError(
            f"--init {init_run}: no tensor of that run's {donor.config['model']['name']} fits this "
            f"{network.__class__.__name__}" + (shapes if differ else " (no tensor names in common)")
        )
    network.load_state_dict(matched, strict=False)
    say(f"initialised {len(matched)}/{len(own)} tensors from {init_run}")
    if differ:
        say(f"--init: {len(differ)} tensor(s) of equal name but different shape start fresh, e.g. {differ[0]}")
    fresh = tuple(name for name in stage_depths(network) if name not in matched)
    if fresh:
        say(f"--init: {len(fresh)} backbone parameter(s) start fresh and learn from the first step, e.g. {fresh[0]}")
    return fresh


def tokenizer_of(task) -> str | None:
    """The task's tokenizer as canonical JSON, or None for inputs that are not tokens."""
    tokenizer = (task.to_json().get("preprocessing") or {}).get("tokenizer")
    return json.dumps(tokenizer, sort_keys=True) if tokenizer is not None else None
