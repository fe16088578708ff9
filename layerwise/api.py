"""`layerwise.fit`: from a folder (or CSV) of raw files to a trained, saved, reported model.

Each step is a small function; `fit` reads as the list of steps.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from layerwise import __version__
from layerwise.baseline import fit_baseline, verdict
from layerwise.bundle import FORMAT_VERSION, Model, load, write_json
from layerwise.data.frontend import FrontEnd, fit_frontend
from layerwise.data.sources import Example, Problem, check_trainable, discover
from layerwise.errors import InputError
from layerwise.models.registry import create_model, model_entry
from layerwise.tasks.classify import classification_metrics, confusion
from layerwise.train.batches import TensorBatches
from layerwise.train.loop import TrainConfig, TrainResult, predict_logits, train

__all__ = ["fit", "load"]

MAX_REPORT_EXAMPLES = 12
console = Console(stderr=True)


def say(message: str) -> None:
    """A progress message on stderr, never wrapped mid-path."""
    console.print(message, soft_wrap=True, highlight=False, markup=False)


def fit(
    data: str | Path,
    out: str | Path | None = None,
    *,
    task: str = "classify",
    modality: str | None = None,
    model: str | None = None,
    epochs: int = 30,
    time_budget: float | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    batch_size: int | None = None,
    lr: float = 3e-3,
    init: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: float = 300.0,
    show_progress: bool = True,
) -> Model:
    """Train a classifier on raw files under `data`; write the run directory `out` if given."""
    started = time.perf_counter()
    if task != "classify":
        raise InputError(f"--task: {task!r} is not available yet (available: classify)")
    if not 0 < val_fraction < 0.5:
        raise InputError(f"--val-fraction must be between 0 and 0.5, not {val_fraction}")
    run_dir = Path(out) if out is not None else None
    if run_dir is not None:
        check_writable(run_dir)
    if resume:  # a resumed run continues with the settings it started with
        saved = saved_settings(run_dir)
        model, seed, val_fraction = saved["model"], saved["seed"], saved["val_fraction"]
        epochs, batch_size, lr, time_budget = saved["epochs"], saved["batch_size"], saved["lr"], saved["time_budget"]
        checkpoint_every = saved["checkpoint_every"]
    seed_everything(seed)

    source = discover(data, modality)
    train_examples, val_examples = stratified_split(source.examples, val_fraction, seed)
    frontend = fit_frontend(source.modality, train_examples)
    console.print(
        f"[bold]{source.root}[/]: {len(source.examples)} {source.modality} examples, {len(source.class_names)} classes"
    )
    decode_started = time.perf_counter()
    train_inputs, kept, train_problems = frontend.decode_all(train_examples)
    train_examples = [train_examples[i] for i in kept]
    val_inputs, kept, val_problems = frontend.decode_all(val_examples)
    val_examples = [val_examples[i] for i in kept]
    decode_seconds = time.perf_counter() - decode_started
    problems = source.problems + train_problems + val_problems
    report_problems(problems)
    check_trainable([ex.label for ex in train_examples + val_examples], source.class_names, source.root)
    if not val_examples:
        raise InputError(f"{source.root}: too few usable examples to hold any out for validation")
    class_names = sorted({ex.label for ex in train_examples + val_examples})
    index = {name: i for i, name in enumerate(class_names)}
    train_labels = torch.tensor([index[ex.label] for ex in train_examples])
    val_labels = torch.tensor([index[ex.label] for ex in val_examples])
    frontend.fit_statistics(train_inputs)

    model_name = model or default_model(source.modality, frontend, len(train_examples))
    model_config = model_overrides(model_name, source.modality, frontend) | {"num_classes": len(class_names)}
    network = create_model(model_name, **model_config)
    if init is not None:
        transfer_weights(network, Path(init))
    batch = batch_size or default_batch_size(len(train_examples))
    config = TrainConfig(
        epochs=epochs, batch_size=batch, lr=lr, time_budget_s=time_budget, seed=seed,
        checkpoint_every_s=checkpoint_every,
    )  # fmt: skip
    run_config = {
        "format": FORMAT_VERSION, "layerwise_version": __version__, "task": task, "modality": source.modality,
        "preprocessing": frontend.to_json(), "model": {"name": model_name, "config": model_config},
        "class_labels": class_names, "train": asdict(config),
        "data": {"source": str(source.root), "n_train": len(train_examples), "n_val": len(val_examples),
                 "n_skipped": len(problems), "val_fraction": val_fraction},
    }  # fmt: skip
    if run_dir is not None:
        write_json(run_dir / "config.json", run_config)
        write_json(run_dir / "problems.json", {"skipped": [p.to_json() for p in problems]})
    n_params = sum(p.numel() for p in network.parameters())
    console.print(
        f"model [bold]{model_name}[/] ({n_params:,} parameters), "
        f"{len(train_examples)} train / {len(val_examples)} validation, batch {batch}"
    )

    train_batches = TensorBatches(
        train_inputs, train_labels, batch, frontend.model_input, frontend.augment, shuffle=True, seed=seed
    )
    val_batches = TensorBatches(val_inputs, val_labels, 512, frontend.model_input)
    result = train(
        network,
        train_batches,
        val_batches,
        config,
        out_dir=run_dir,
        resume=resume,
        show_progress=show_progress,
        log=say,
    )
    bundle = Model(network, frontend, class_names, run_config)

    val_logits, _ = predict_logits(network, val_batches)
    metrics = classification_metrics(val_logits, val_labels, len(class_names))
    baseline = run_baseline(frontend, train_inputs, train_labels, val_inputs, val_labels, seed)
    summary = {
        "metrics": metrics,
        "baseline": baseline,
        "verdict": verdict(metrics["accuracy"], baseline.get("accuracy")),
        "split": f"validation: {val_fraction:.0%} of the data, stratified, seed {seed} (also used for early stopping)",
        "model": model_name, "parameters": n_params, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason, "train_seconds": round(result.seconds, 1),
        "decode_seconds": round(decode_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1), "n_skipped": len(problems),
        "device": str(next(network.parameters()).device), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }  # fmt: skip
    if run_dir is not None:
        bundle.save(run_dir)
        write_json(run_dir / "metrics.json", summary)
        write_run_report(run_dir, bundle, summary, result, val_logits, val_labels, val_inputs, val_examples, problems)
    bundle.summary = summary
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


def saved_settings(run_dir: Path | None) -> dict:
    """The training settings stored in RUN/config.json, for --resume."""
    if run_dir is None or not (run_dir / "config.json").is_file():
        raise InputError(f"--resume: {run_dir} holds no run to resume (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    train = config["train"]
    return {
        "model": config["model"]["name"], "seed": train["seed"], "val_fraction": config["data"]["val_fraction"],
        "epochs": train["epochs"], "batch_size": train["batch_size"], "lr": train["lr"],
        "time_budget": train["time_budget_s"], "checkpoint_every": train["checkpoint_every_s"],
    }  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stratified_split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `val_fraction` of each class (at least one example of any class with two or more)."""
    by_class: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_class[example.label].append(example)
    rng = random.Random(seed)
    train_part, val_part = [], []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        n_val = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val_part += members[:n_val]
        train_part += members[n_val:]
    return train_part, val_part


def report_problems(problems: list[Problem], shown: int = 20) -> None:
    if not problems:
        return
    console.print(f"[yellow]skipped {len(problems)} unusable input(s):[/]")
    for problem in problems[:shown]:
        console.print(f"  {problem.origin}: {problem.reason}", markup=False, highlight=False, soft_wrap=True)
    if len(problems) > shown:
        console.print(f"  ... and {len(problems) - shown} more (all listed in problems.json)")


def default_model(modality: str, frontend: FrontEnd, n_train: int) -> str:
    """A good default per modality, from the input size and the amount of data."""
    if modality == "text":
        return "transformer_tiny" if n_train < 50_000 else "transformer_small"
    if modality == "image" and frontend.prep.side <= 48:
        return "convnet_s"  # fast and accurate on small images (Fashion-MNIST: ~93.5%)
    return "resnet_s"


def model_overrides(model_name: str, modality: str, frontend: FrontEnd) -> dict:
    """Builder arguments the data decides: input channels / vocabulary, and the stem stride."""
    entry = model_entry(model_name)
    if modality not in entry.modalities:
        raise InputError(
            f"--model {model_name} does not take {modality} input (it takes {', '.join(entry.modalities)})"
        )
    config = dict(frontend.model_inputs)
    if model_name.startswith("resnet"):
        # Spectrograms (64 bands x 100 frames a second) and large images are downsampled early.
        large = modality == "audio" or frontend.prep.side > 64
        config["stem_stride"] = 2 if large else 1
    return config


def default_batch_size(n_train: int) -> int:
    """256 for large data; smaller for small data so each epoch still takes several steps."""
    return int(min(256, max(16, 2 ** round(np.log2(max(n_train, 1) / 8)))))


def transfer_weights(network: torch.nn.Module, init_run: Path) -> None:
    """Start from another run's weights wherever names and shapes match (the head usually won't)."""
    donor = load(init_run).network.state_dict()
    own = network.state_dict()
    matched = {k: v for k, v in donor.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise InputError(f"--init {init_run}: no tensor of that model fits this one")
    network.load_state_dict(matched, strict=False)
    say(f"initialised {len(matched)}/{len(own)} tensors from {init_run}")


def run_baseline(frontend: FrontEnd, train_inputs, train_labels, val_inputs, val_labels, seed: int) -> dict:
    return fit_baseline(
        frontend.modality,
        frontend.baseline_features(train_inputs),
        train_labels.numpy(),
        frontend.baseline_features(val_inputs),
        val_labels.numpy(),
        seed=seed,
    )


def write_run_report(
    run_dir, bundle, summary, result: TrainResult, val_logits, val_labels, val_inputs, val_examples, problems
) -> None:
    from layerwise.explain import layers_report_section
    from layerwise.report import Example as ReportExample
    from layerwise.report import ReportData, write_report

    probabilities = torch.softmax(val_logits, 1)
    wrong = (val_logits.argmax(1) != val_labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(probabilities[i].max()))  # confidently wrong first
    examples = []
    for i in wrong[:MAX_REPORT_EXAMPLES]:
        preview = bundle.frontend.preview(val_inputs[i])
        examples.append(
            ReportExample(
                path=val_examples[i].origin,
                true_label=val_examples[i].label,
                predicted_label=bundle.class_names[int(val_logits[i].argmax())],
                confidence=float(probabilities[i].max()),
                preview_png=preview if isinstance(preview, bytes) else None,
                text=preview if isinstance(preview, str) else None,
            )
        )
    config = bundle.config
    data = ReportData(
        title=f"layerwise run: {Path(config['data']['source']).name}",
        summary={
            "task": config["task"],
            "modality": config["modality"],
            "model": f"{summary['model']} ({summary['parameters']:,} parameters)",
            "data": config["data"]["source"],
            "examples": (
                f"{config['data']['n_train']} train, {config['data']['n_val']} validation, {len(problems)} skipped"
            ),
            "epochs": f"{summary['epochs_run']} (best: {summary['best_epoch']}); {summary['stop_reason']}",
            "training time": f"{summary['train_seconds']} s on {summary['device']} ({summary['machine']})",
            "layerwise": config["layerwise_version"],
        },  # fmt: skip
        history=result.history,
        class_names=bundle.class_names,
        confusion=confusion(val_logits, val_labels, len(bundle.class_names)).tolist(),
        metrics=summary["metrics"],
        baseline=summary["baseline"],
        verdict=summary["verdict"],
        examples=examples,
        problems=[p.to_json() for p in problems],
        extra_sections=[layers_report_section(bundle, val_inputs, val_labels, log=say)],
    )
    write_report(run_dir / "report.html", data)
