"""`layerwise.pretrain`: features learned from files without labels, saved as a run that `train --init` starts from.

The steps, like `fit`'s: discover the files (any folder tree or CSV; labels are ignored), fit the modality's
front end, decode, hold out a random part, build a registered classifier's backbone with a pretext head,
train it with the one training loop (time budget, checkpoints, exact --resume, Ctrl-C and the progress bar
come with it), then probe the frozen features on labelled data when given, and write the run directory:

    RUN/config.json          task "pretrain", modality, preprocessing, model name + config (a classifier whose
                             placeholder one-class head is never trained), the objective
    RUN/model.safetensors    that classifier's weights: the backbone `layerwise train --init RUN` copies
    RUN/projector.safetensors the pretext head (SimCLR projector or masked-token head), kept for reference
    RUN/metrics.json         held-out pretext loss; kNN and linear-probe accuracy beside a random network's and
                             the raw input's; RUN/history.jsonl, RUN/report.html, RUN/checkpoints/, problems.json
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerwise import __version__
from layerwise.api import (
    Settings,
    check_writable,
    finished,
    load_finished,
    outputs_match,
    quiet,
    refuse_existing_run,
    report_problems,
    resumable_checkpoint,
    resumed_settings,
    saved_config,
    say,
    seed_everything,
)
from layerwise.bundle import CONFIG_FILE, FORMAT_VERSION, Model
from layerwise.data.frontend import FrontEnd, fit_frontend, frontend_from_json
from layerwise.data.sources import Problem, check_trainable, discover, problems_note
from layerwise.data.views import ViewBatches, image_views, mask_tokens, spectrogram_views
from layerwise.errors import InputError
from layerwise.files import write_json, write_safetensors
from layerwise.models.registry import create_model
from layerwise.models.ssl import Contrastive, MaskedTokens, ProjectionHead, TokenPredictionHead
from layerwise.runtime import resolve_device, resolve_precision
from layerwise.tasks.base import fingerprint
from layerwise.tasks.classify import check_same_data, default_model, example_key, model_overrides
from layerwise.tasks.pretrain import (
    CONTRASTIVE,
    PLACEHOLDER_CLASSES,
    TEMPERATURE,
    ContrastiveObjective,
    MaskedTokenObjective,
    PretrainTask,
    objective_name,
)
from layerwise.tasks.probe import ProbeSet, dense, embed
from layerwise.training.distributed import device_for, process_group_from_env
from layerwise.training.loop import TrainConfig, TrainResult, train

__all__ = ["pretrain"]

MIN_BATCH = 8  # fewer inputs per batch leave a contrastive loss almost nothing to contrast with
MIN_VAL = 2  # held-out inputs: a contrastive loss needs a pair of them
MAX_VAL = 1024  # ... and more than this only slow every epoch's validation down (59,000 images: 6,000 -> 1,024)
# Inputs per batch (contrastive: pairs, so twice as many views). On 2 CPU cores 128 pairs of 28-px images
# run ~900 views/s through convnet_s; 256 pairs ran at a third of that speed per view (cache-bound).
DEFAULT_BATCH = {CONTRASTIVE: 128, "masked_tokens": 64}
DEFAULT_LR = 2e-3
PATIENCE = 10  # pretext losses improve slowly and noisily: stop only after 10 epochs without a better one
PROJECTION_POINTS = 1000  # t-SNE points: ~3 s on 2 cores
PROJECTOR_FILE = "projector.safetensors"


@dataclass(frozen=True)
class Unlabelled:
    """The decoded unlabelled inputs, split, with the fitted front end."""

    frontend: FrontEnd
    train_inputs: torch.Tensor
    val_inputs: torch.Tensor
    problems: list[Problem]
    summary: dict  # config.json "data"
    batch_size: int
    decode_seconds: float


def pretrain(
    data: str | Path,
    out: str | Path | None = None,
    *,
    modality: str | None = None,
    model: str | None = None,
    epochs: int | None = None,
    time_budget: float | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    probe: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: float | None = None,
    device: str | None = None,
    precision: str | None = None,
    compile: bool | None = None,
    show_progress: bool = True,
) -> Model:
    """Learn features from the unlabelled files under `data`; write the run directory `out` if given.

    `probe`: labelled data (class folders or a CSV with `label`) of the same modality, on which the frozen
    features are scored by kNN and a linear probe. Returns the backbone as a `Model` with `.summary`.
    Started by torchrun (WORLD_SIZE > 1), every process trains on its part of each batch (a contrastive
    loss contrasts the views of its own part) and rank 0 alone probes and writes the run.
    """
    started = time.perf_counter()
    group = process_group_from_env()
    log = say if group.writes_run else quiet
    given = {
        "modality": modality, "model": model, "seed": seed, "val_fraction": val_fraction, "batch_size": batch_size,
        "lr": lr, "epochs": epochs, "time_budget": time_budget, "checkpoint_every": checkpoint_every,
        "device": device, "precision": precision, "compile": compile,
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    run_dir = Path(out) if out is not None else None
    saved = saved_config(run_dir) if resume else None
    if saved is None:
        if run_dir is not None and group.writes_run:
            refuse_existing_run(run_dir)
        settings = Settings(task=PretrainTask.name, **given)
    else:
        if saved.get("task") != PretrainTask.name:
            raise InputError(f"--resume: {run_dir} holds a {saved.get('task')} run; continue it with `layerwise train`")
        settings = resumed_settings(saved, given, log)
        probe = probe if probe is not None else saved.get("probe")
    if batch_size is not None and batch_size < MIN_BATCH:
        raise InputError(f"--batch-size must be at least {MIN_BATCH} for pretraining, not {batch_size}")
    resolve_precision(settings.precision, resolve_device(device_for(group, settings.device)))  # fail before any work
    if run_dir is not None and group.writes_run:
        check_writable(run_dir)
    seed_everything(settings.seed)

    unlabelled = read_unlabelled(Path(data), settings, saved, log)
    frontend = unlabelled.frontend
    if unlabelled.batch_size // group.world_size < MIN_BATCH:
        raise InputError(
            f"--batch-size {unlabelled.batch_size} over {group.world_size} processes leaves each fewer than "
            f"{MIN_BATCH} inputs a batch; give --batch-size {MIN_BATCH * group.world_size} or more"
        )
    if group.writes_run:
        report_problems(unlabelled.problems)
    probe_set = read_probe(Path(probe), frontend, settings.seed, log) if probe is not None else None
    model_name = settings.model or default_model(frontend.modality, frontend, len(unlabelled.train_inputs))
    model_config = model_overrides(model_name, frontend.modality, frontend) | {"num_classes": PLACEHOLDER_CLASSES}
    backbone = create_model(model_name, **model_config)
    network, objective, make_batch = pretext(backbone, frontend, probe_set)
    task = PretrainTask(frontend, objective_name(frontend.modality))
    config = TrainConfig(
        epochs=settings.epochs, batch_size=unlabelled.batch_size, lr=settings.lr or DEFAULT_LR,
        time_budget_s=settings.time_budget, seed=settings.seed, checkpoint_every_s=settings.checkpoint_every,
        patience=PATIENCE, device=settings.device, precision=settings.precision, compile=settings.compile,
    )  # fmt: skip
    run_config = {
        "format": FORMAT_VERSION, "layerwise_version": __version__, "task": task.name, **task.to_json(),
        "model": {"name": model_name, "config": model_config}, "train": asdict(config), "data": unlabelled.summary,
        "probe": None if probe is None else str(probe),
        "pretext_head": {"file": PROJECTOR_FILE, "kind": type(network.projector).__name__,
                         **({"temperature": TEMPERATURE} if task.objective == CONTRASTIVE else {})},
    }  # fmt: skip
    checkpoint = None
    if saved is not None:
        checkpoint = resumable_checkpoint(run_dir, log)
        if checkpoint is not None and finished(checkpoint, config) and outputs_match(run_dir, checkpoint):
            log(f"{run_dir}: the run has already finished ({checkpoint.state['loop']['stop_reason']}); nothing to do")
            return load_finished(run_dir)
    if run_dir is not None and group.writes_run:
        write_json(run_dir / CONFIG_FILE, run_config)
        write_json(run_dir / "problems.json", {"skipped": [p.to_json() for p in unlabelled.problems]})
    n_params = sum(p.numel() for p in backbone.parameters())
    processes = f", {group.world_size} processes" if group.distributed else ""
    log(
        f"pretraining {model_name} ({n_params:,} parameters) by {task.objective.replace('_', ' ')} on "
        f"{len(unlabelled.train_inputs)} inputs ({len(unlabelled.val_inputs)} held out), batch "
        f"{unlabelled.batch_size}{processes}"
    )
    train_batches = ViewBatches(unlabelled.train_inputs, unlabelled.batch_size, make_batch, shuffle=True,
                                seed=settings.seed)  # fmt: skip
    val_batches = ViewBatches(unlabelled.val_inputs, unlabelled.batch_size, make_batch, seed=settings.seed)
    result = train(  # the processes leave their group when it returns: what follows is rank 0's alone
        network, train_batches, val_batches, config, out_dir=run_dir, resume=checkpoint or False,
        show_progress=show_progress, log=log, objective=objective,
    )  # fmt: skip
    bundle = Model(backbone, task, run_config)
    if not group.writes_run:
        return bundle

    final = objective.evaluate(network, val_batches)
    probes = probe_rows(backbone, model_name, model_config, frontend, probe_set, settings.seed)
    summary = summarise(final, probes, probe_set, result, unlabelled, settings, model_name, n_params, backbone)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary["processes"] = group.world_size
    if run_dir is not None:
        bundle.save(run_dir)
        write_safetensors(run_dir / PROJECTOR_FILE, network.projector.state_dict(), {"layerwise_version": __version__})
        write_pretrain_report(run_dir, bundle, summary, result, unlabelled, probe_set, probes)
        write_json(run_dir / "metrics.json", summary)  # last: its "steps" marks the run files as complete
    bundle.summary = summary
    return bundle


# ---------------------------------------------------------------------- data


def read_unlabelled(data: Path, settings: Settings, saved: dict | None, log=say) -> Unlabelled:
    """Discover (labels ignored), fit or restore the front end, decode, check there is enough, split."""
    source = discover(data, settings.modality, labelled=False)
    frontend = frontend_from_json(saved["preprocessing"]) if saved else fit_frontend(source.modality, source.examples)
    log(f"{source.root}: {len(source.examples)} {source.modality} files")
    decode_started = time.perf_counter()
    inputs, kept, decode_problems = frontend.decode_all(source.examples)
    decode_seconds = time.perf_counter() - decode_started
    problems = source.problems + decode_problems
    examples = [source.examples[i] for i in kept]
    batch = settings.batch_size or default_batch(objective_name(source.modality), len(examples), settings.val_fraction)
    check_enough(source.root, source.modality, len(examples), batch, settings.val_fraction, problems)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(settings.seed))
    n_val = held_out(len(examples), settings.val_fraction)
    val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values
    if not saved:
        frontend.fit_statistics(inputs[train_index])
    summary = {
        "source": str(source.root), "n_train": len(train_index), "n_val": n_val, "n_skipped": len(problems),
        "val_fraction": settings.val_fraction,
        "fingerprint": fingerprint(
            [f"train {example_key(examples[i], source.root)}" for i in train_index.tolist()]
            + [f"val {example_key(examples[i], source.root)}" for i in val_index.tolist()]
        ),
    }  # fmt: skip
    if saved:
        check_same_data(saved["data"], summary, source.root)
    return Unlabelled(frontend, inputs[train_index], inputs[val_index], problems, summary, batch, decode_seconds)


def held_out(n: int, val_fraction: float) -> int:
    """How many of `n` inputs validation holds out: `val_fraction` of them, at least MIN_VAL, at most MAX_VAL."""
    return min(MAX_VAL, max(MIN_VAL, math.floor(val_fraction * n)))


def default_batch(objective: str, n: int, val_fraction: float) -> int:
    """DEFAULT_BATCH, or for small data the largest power of two that leaves two training batches an epoch."""
    n_train = n - held_out(n, val_fraction)
    fits = 2 ** int(math.log2(max(n_train // 2, 1)))
    return max(MIN_BATCH, min(DEFAULT_BATCH[objective], fits))


def check_enough(root: Path, modality: str, n: int, batch: int, val_fraction: float, problems: list[Problem]) -> None:
    """Refuse, before any training, data too small for one batch plus the held-out part."""
    needed = max(batch + MIN_VAL, math.ceil(batch / (1 - val_fraction)))
    if n >= needed:
        return
    note = problems_note(problems)
    raise InputError(
        f"{root}: {n} usable {modality} file(s) found, too few to pretrain on: at least {needed} are needed "
        f"(a batch of {batch} plus {val_fraction:.0%} held out, at least {MIN_VAL}); add files"
        + (" or lower --batch-size" if batch > MIN_BATCH else "")
        + (f" ({note})" if note else "")
    )


def read_probe(path: Path, frontend: FrontEnd, seed: int, log=say) -> ProbeSet:
    """The labelled probe set, decoded with the pretraining front end; refused before training when unusable."""
    try:
        source = discover(path)
    except InputError as err:
        raise InputError(
            f"--probe: {err} (the probe set needs labels: class folders or a CSV with a 'label' column)"
        ) from None
    if source.modality != frontend.modality:
        raise InputError(
            f"--probe {path}: {source.modality} data, but the pretraining data is {frontend.modality}; "
            f"give labelled {frontend.modality} data"
        )
    inputs, kept, problems = frontend.decode_all(source.examples)
    labels = [source.examples[i].label for i in kept]
    try:
        check_trainable(labels, source.class_names, source.root)
    except InputError as err:
        raise InputError(f"--probe: {err}") from None
    class_names = sorted(set(labels))
    index = {name: i for i, name in enumerate(class_names)}
    if problems or source.problems:
        log(f"--probe: skipped {len(problems) + len(source.problems)} unusable input(s) of {path}")
    probe_set = ProbeSet.split(str(path), inputs, torch.tensor([index[x] for x in labels]), class_names, seed)
    log(f"--probe: {probe_set.describe()}")
    return probe_set


# ---------------------------------------------------------------------- network and objective


def pretext(backbone: nn.Module, frontend: FrontEnd, probe: ProbeSet | None):
    """(network to train, objective, batch maker) for the modality: SimCLR for images and audio, BERT for text."""
    modality = frontend.modality
    if modality == "text":
        vocab = frontend.model_inputs["vocab_size"]
        network = MaskedTokens(backbone, TokenPredictionHead(backbone.num_features, vocab))
        return network, MaskedTokenObjective(frontend.model_input, probe), lambda ids, g: mask_tokens(ids, vocab, g)
    if modality == "image":

        def views(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return image_views(batch, frontend.prep, generator)
    else:
        views = spectrogram_views

    def make_batch(batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = frontend.model_input(views(batch, generator))  # (2B, ...) standardised like a classifier's input
        return pairs, torch.zeros(len(pairs), dtype=torch.int64)  # no targets: a view's partner is the target

    network = Contrastive(backbone, ProjectionHead(backbone.num_features))
    return network, ContrastiveObjective(frontend.model_input, probe), make_batch


# ---------------------------------------------------------------------- after training


def probe_rows(
    backbone: nn.Module, model_name: str, model_config: dict, frontend: FrontEnd, probe: ProbeSet | None, seed: int
) -> list[tuple[str, float, float]]:
    """(features, kNN accuracy, linear-probe accuracy) for the pretrained network, the same network at random
    initialisation, and the raw input; [] without a probe set."""
    if probe is None:
        return []
    torch.manual_seed(seed)
    random_network = create_model(model_name, **model_config)
    raw = dense(frontend.baseline_features(probe.inputs))
    rows = []
    for name, features in (
        ("pretrained network", embed(backbone, probe.inputs, frontend.model_input)),
        ("the same network, randomly initialised", embed(random_network, probe.inputs, frontend.model_input)),
        ("raw input (no learning)", torch.from_numpy(raw)),
    ):
        rows.append((name, probe.knn(features), probe.linear(features, seed)))
    return rows


def summarise(final: dict, probes: list, probe: ProbeSet | None, result: TrainResult, unlabelled: Unlabelled,
              settings: Settings, model_name: str, n_params: int, backbone: nn.Module) -> dict:  # fmt: skip
    """metrics.json: the held-out pretext metrics, the probes, and how the run went."""
    metrics = dict(final)
    baseline: dict = {}
    if probes:
        (_, knn, linear), (_, random_knn, random_linear), (_, raw_knn, raw_linear) = probes
        metrics |= {"knn_accuracy": knn, "linear_probe_accuracy": linear}
        baseline = {"model": "the same probes on the raw input", "knn_accuracy": raw_knn,
                    "linear_probe_accuracy": raw_linear}  # fmt: skip
        verdict = (
            f"Frozen pretrained features: kNN accuracy {knn:.1%} and linear probe {linear:.1%} on the probe set, "
            f"against {random_knn:.1%} / {random_linear:.1%} for the same network untrained and "
            f"{raw_knn:.1%} / {raw_linear:.1%} on the raw input."
        )
    else:
        first = result.history[0]["val_loss"] if result.history else float("nan")
        verdict = (
            f"The held-out pretext loss went from {first:.3f} after the first epoch to {final['loss']:.3f}; give "
            "--probe LABELLED to measure how useful the features are."
        )
    return {
        "metrics": metrics,
        "baseline": baseline,
        "random_init": {"knn_accuracy": probes[1][1], "linear_probe_accuracy": probes[1][2]} if probes else {},
        "verdict": verdict,
        "probe": probe.describe() if probe is not None else None,
        "split": f"validation: a random {settings.val_fraction:.0%} of the unlabelled inputs (at most {MAX_VAL}), "
        f"seed {settings.seed} (monitors the pretext loss; early stopping keeps the best)",
        "model": model_name, "parameters": n_params, "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "stop_reason": result.stop_reason, "steps": result.global_step,
        "train_seconds": round(result.seconds, 1), "decode_seconds": round(unlabelled.decode_seconds, 1),
        "n_skipped": len(unlabelled.problems), "device": str(next(backbone.parameters()).device),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }  # fmt: skip


def write_pretrain_report(run_dir: Path, bundle: Model, summary: dict, result: TrainResult, unlabelled: Unlabelled,
                          probe: ProbeSet | None, probes: list) -> None:  # fmt: skip
    """RUN/report.html: the loss curves, the probes and a t-SNE of the features."""
    from threadpoolctl import threadpool_limits

    from layerwise.explain.layers import project_2d
    from layerwise.report import ReportData, write_report
    from layerwise.report.pretrain_sections import probes_html, projection_html
    from layerwise.tasks.classify import report_summary

    frontend = bundle.task.frontend
    if probe is not None:
        inputs, labels, what = probe.inputs, probe.labels.numpy(), "probe-set examples"
    else:
        inputs, labels, what = unlabelled.val_inputs, None, "held-out inputs"
    keep = np.sort(np.random.default_rng(0).permutation(len(inputs))[:PROJECTION_POINTS])
    features = embed(bundle.network, inputs[torch.from_numpy(keep)], frontend.model_input).numpy()
    # One OpenMP thread: t-SNE's Barnes-Hut threads spin-wait, and on 2 busy cores 1,000 points took 39 s
    # with two threads against 8 s with one.
    with threadpool_limits(1):
        points = project_2d(features, 0)
    sections = [("t-SNE of the features", projection_html(
        points, None if labels is None else labels[keep], probe.class_names if probe else [], what
    ))]  # fmt: skip
    if probes:
        sections.insert(0, ("Frozen-feature probes", probes_html(probes, probe.describe(), result.history)))
    metrics = {k: v for k, v in summary["metrics"].items() if isinstance(v, float | int)}
    data = ReportData(
        title=f"layerwise pretraining: {Path(bundle.config['data']['source']).name}",
        summary=report_summary(bundle.config, summary) | {"objective": bundle.task.objective.replace("_", " ")},
        history=result.history, class_names=[], confusion=[], metrics=metrics, baseline=summary["baseline"],
        verdict=summary["verdict"], examples=[], problems=[p.to_json() for p in unlabelled.problems],
        monitor="knn_accuracy" if probes else "loss", higher_is_better=bool(probes), extra_sections=sections,
    )  # fmt: skip
    write_report(run_dir / "report.html", data)


def print_pretrain(summary: dict, console, run_dir: Path | None) -> None:
    """The CLI's human summary: the probes (or the held-out loss), the verdict, where the run is."""
    from rich.table import Table

    metrics = summary["metrics"]
    if summary["baseline"]:
        table = Table(title="frozen features on the probe set")
        for column in ("features", "kNN (k=20)", "linear probe"):
            table.add_column(column, justify="left" if column == "features" else "right")
        for name, scores in (("pretrained", metrics), ("random init", summary["random_init"]),
                             ("raw input", summary["baseline"])):  # fmt: skip
            table.add_row(name, f"{scores['knn_accuracy']:.1%}", f"{scores['linear_probe_accuracy']:.1%}")
        console.print(table)
    console.print(f"held-out pretext loss {metrics['loss']:.4f}", highlight=False)
    console.print(summary["verdict"], highlight=False, soft_wrap=True)
    console.print(f"stopped: {summary['stop_reason']}; pretraining took {summary['train_seconds']} s", highlight=False)
    if run_dir is not None:
        console.print(
            f"run directory: {run_dir}  (report: {run_dir / 'report.html'}); fine-tune it with "
            f"`layerwise train LABELLED --out RUN --init {run_dir}`",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
