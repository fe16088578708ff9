"""The `layerwise` command line: each subcommand is a plain typed function (typer builds the parser).

Exit codes: 0 success, 2 bad usage or bad input (the message names the file or field), 1 internal error.
"""

from __future__ import annotations

import functools
import json
import os
import sys

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). On a machine where other
# programs hold some of the cores, a spinning thread burns the time slice its partner needs: training ran 2.3x
# faster with two CPU-bound processes beside it, and the same on a quiet machine (benchmarks/busy_machine.py).
# It only counts before the OpenMP runtime starts, so it is set here, before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from layerwise.data.shards import DEFAULT_SHARD_SIZE  # noqa: E402
from layerwise.errors import InputError  # noqa: E402

app = typer.Typer(
    help="layerwise: raw images, audio and text in; a trained deep network you can trust out.",
    no_args_is_help=True,
    add_completion=False,
)
err_console = Console(stderr=True)
out_console = Console()


INTERRUPTED_EXIT = 130


def exits_cleanly(command):
    """Bad input -> its message and exit 2, no traceback. Ctrl-C -> exit 130 (also outside training)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as err:
            err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]; a training run in progress can continue with --resume", highlight=False
            )
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except Exception as err:
            # Imported only here: inference commands must not import the training loop.
            training = sys.modules.get("layerwise.training.loop")
            if training is not None and isinstance(err, training.TrainingInterrupted):
                message = f"[yellow]interrupted:[/] {escape(str(err))}; continue with --resume"
                err_console.print(message, highlight=False, soft_wrap=True)
                raise typer.Exit(INTERRUPTED_EXIT) from None
            if training is not None and isinstance(err, training.TrainingDiverged):
                err_console.print(f"[red]training diverged:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            raise

    return wrapper


def read_texts(texts: list[str] | None) -> list[str]:
    """--text values; `--text -` reads one text per line from standard input."""
    result: list[str] = []
    for text in texts or []:
        if text == "-":
            result += [line for line in sys.stdin.read().splitlines() if line.strip()]
        else:
            result.append(text)
    return result


def print_summary(bundle, run_dir: Path | None) -> None:
    summary = bundle.summary
    table = Table(title="held-out validation split", show_header=True)
    table.add_column("model")
    table.add_column(bundle.task.monitor.replace("_", " "), justify="right")
    for name, value in bundle.task.summary_rows(summary):
        table.add_row(name, value)
    out_console.print(table)
    out_console.print(summary["verdict"])
    if "learning_curve" in summary:
        out_console.print(f"learning curve: {summary['learning_curve']}")
    out_console.print(f"stopped: {summary['stop_reason']}; training took {summary['train_seconds']} s")
    if run_dir is not None:
        out_console.print(f"run directory: {run_dir}  (report: {run_dir / 'report.html'})")


# Where and how to train: the same options on `train` and `pretrain`.
DeviceOption = Annotated[
    str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps. [default: auto: a GPU when there is one]")
]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        help="fp32, bf16 or fp16 (autocast; fp16 with loss scaling). "
        "[default: auto: bf16 where the hardware has it natively, else fp32]"
    ),
]
CompileOption = Annotated[
    bool | None,
    typer.Option("--compile/--no-compile", help="torch.compile the training step (slow to start, faster steps)."),
]
DevicesOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="Train data-parallel in N processes on this machine (torchrun; one per GPU, or sharing the CPU). "
        "Many machines: start torchrun on each, see the README.",
    ),
]
StrategyOption = Annotated[
    str | None,
    typer.Option(
        help="With --devices: ddp replicates the network in every process; fsdp shards its weights, gradients and "
        "optimizer state across them (for networks whose training does not fit one device). [default: ddp]"
    ),
]
MaxRestartsOption = Annotated[
    int,
    typer.Option(
        "--max-restarts",
        min=0,
        help="With --devices: restart all processes up to N times after a failure; they resume from the last "
        "checkpoint.",
    ),
]


@app.command("train")
@exits_cleanly
def train_command(
    data: Annotated[
        Path, typer.Argument(help="Folder with one subfolder per class, or a CSV manifest (label + path or text).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    task: Annotated[
        str | None, typer.Option(help="What to learn: classify, detect or generate (default: detected from DATA).")
    ] = None,
    modality: Annotated[
        str | None, typer.Option(help="image, audio or text (default: detected from the files).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Registered model name (default: chosen from the data); see `layerwise models`.")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Maximum epochs (early stopping may end sooner). [default: 30]")
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option("--time-budget", help="Stop cleanly after SEC seconds of training, keeping the best model."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for the split, initialisation, order and augmentation. [default: 0]")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Fraction held out for validation. [default: 0.1]")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Default: chosen from the data size.")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (AdamW, warmup + cosine). [default: 0.003; detect 0.002]")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last checkpoint, with its saved settings; "
            "only --epochs, --time-budget, --checkpoint-every, --device, --precision and --compile may change.",
        ),
    ] = False,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from the weights of another run (transfer learning): a run of the same task, a "
            "`layerwise pretrain` run, or an image classifier for detect. The new head learns alone first.",
        ),
    ] = None,
    freeze_fraction: Annotated[
        float | None,
        typer.Option(
            "--freeze-fraction",
            help="With --init: the fraction of the run the transferred backbone stays fixed. [default: 0.1]",
        ),
    ] = None,
    layer_decay: Annotated[
        float | None,
        typer.Option(
            "--layer-decay",
            help="With --init: each earlier stage learns at this fraction of the next one's rate. [default: 0.75]",
        ),
    ] = None,
    curve: Annotated[
        Path | None,
        typer.Option(
            "--curve",
            help="A `layerwise curve` folder made on this data: its learning curve goes into the run's report.",
        ),
    ] = None,
    checkpoint_every: Annotated[
        float | None,
        typer.Option("--checkpoint-every", help="Also checkpoint mid-epoch at most every SEC seconds. [default: 300]"),
    ] = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    compile_model: CompileOption = None,
    devices: DevicesOption = 1,
    strategy: StrategyOption = None,
    max_restarts: MaxRestartsOption = 0,
    progress: Annotated[bool, typer.Option(help="Show the live progress bar.")] = True,
) -> None:
    """Train a deep network on raw files and write the run directory."""
    from layerwise.training.distributed import STRATEGIES, process_group_from_env

    # Refused here, once, rather than by every process torchrun starts.
    if strategy is not None and strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and compile_model:
        raise InputError("--compile with --strategy fsdp is not supported; train without --compile or with ddp")
    group = process_group_from_env()
    resume = launch_or_resume(group, out, resume, device, precision, devices, max_restarts)
    from layerwise.api import fit

    bundle = fit(
        data, out, task=task, modality=modality, model=model, epochs=epochs, time_budget=time_budget, seed=seed,
        val_fraction=val_fraction, batch_size=batch_size, lr=lr, init=init, resume=resume, show_progress=progress,
        freeze_fraction=freeze_fraction, layer_decay=layer_decay,
        checkpoint_every=checkpoint_every, device=device, precision=precision, compile=compile_model, curve=curve,
        strategy=strategy,
    )  # fmt: skip
    if group.writes_run:
        print_summary(bundle, out)


def launch_or_resume(group, out: Path, resume: bool, device, precision, devices: int, max_restarts: int) -> bool:
    """With --devices N, run this very command under torchrun (and exit with its status); in a process that
    torchrun restarted after a failure, resume. Returns whether to resume."""
    from layerwise.training.distributed import launch, restarted_by_torchrun

    if devices > 1 and not group.distributed:
        check_before_launch(out, resume, device, precision)
        raise typer.Exit(launch(devices, without_options(sys.argv[1:], ("--devices", "--max-restarts")), max_restarts))
    if restarted_by_torchrun() and (out / "config.json").is_file():
        return True  # torchrun restarted the processes after a failure: continue from the last checkpoint
    return resume


def check_before_launch(out: Path, resume: bool, device: str | None, precision: str | None) -> None:
    """What would stop every process is refused here, once, with exit code 2 (torchrun would report 1)."""
    from layerwise.api import check_writable, refuse_existing_run
    from layerwise.runtime import resolve_device, resolve_precision

    if device is not None and device.startswith("cuda:"):
        raise InputError(f"--device {device} with --devices: each process takes its own GPU; give --device cuda")
    resolve_precision(precision or "auto", resolve_device(device or "auto"))
    if not resume:
        refuse_existing_run(out)
    check_writable(out)


def without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` less the options `names` and their values (`--name V` or `--name=V`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


@app.command("pack")
@exits_cleanly
def pack_command(
    data: Annotated[Path, typer.Argument(help="Training data, as `layerwise train` takes it.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the shards and index.json.")],
    task: Annotated[
        str | None,
        typer.Option(help="What the data is for (default: detected; classify, detect, generate, fold, transcribe)."),
    ] = None,
    modality: Annotated[str | None, typer.Option(help="image, audio or text (default: detected).")] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Fraction held out for validation, fixed in the shards.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split and of the order the examples are packed in.")] = 0,
    shard_size: Annotated[
        int | None,
        typer.Option(
            "--shard-size",
            min=1,
            help=f"Examples per shard (default: {DEFAULT_SHARD_SIZE}; detection: images filling about 256 MB).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print index.json's summary as one JSON object.")] = False,
) -> None:
    """Decode and validate DATA once into shards; `layerwise train SHARDS` streams them in bounded memory."""
    from layerwise.api import report_problems, say
    from layerwise.pack import pack

    index = pack(
        data, out, task=task, modality=modality, val_fraction=val_fraction, seed=seed, shard_size=shard_size,
        log=(lambda _: None) if as_json else say,
    )  # fmt: skip
    summary = {k: index.get(k) for k in ("task", "modality", "n_train", "n_val", "class_labels", "seconds")}
    summary |= {"shards": len(index["shards"]), "skipped": len(index["skipped"]), "out": str(out)}
    if as_json:
        print(json.dumps(summary))
        return
    from layerwise.data.sources import Problem

    report_problems([Problem(p["path"], p["reason"]) for p in index["skipped"]])
    units = index.get("units", "examples")
    err_console.print(
        f"packed {summary['n_train']:,} training and {summary['n_val']:,} validation {units} into "
        f"{summary['shards']} shards in {out} ({summary['seconds']:.0f} s); train with: layerwise train {out} --out RUN"
    )


@app.command("pretrain")
@exits_cleanly
def pretrain_command(
    data: Annotated[
        Path, typer.Argument(help="Unlabelled files: a folder (nested or flat; labels are ignored) or a CSV manifest.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Run directory to write; `layerwise train --init` starts from it.")
    ],
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Stop cleanly after SEC seconds of pretraining.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs. [default: 30]")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Registered classifier whose backbone to pretrain (default: chosen from the data)."),
    ] = None,
    modality: Annotated[str | None, typer.Option(help="image, audio or text (default: detected).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Inputs per batch (default: 128 images/clips, 64 texts).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the split, initialisation and views. [default: 0]")] = None,
    probe: Annotated[
        Path | None,
        typer.Option(
            "--probe", help="Labelled data (same modality) to score the frozen features on: kNN, linear probe."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
    compile_model: CompileOption = None,
    devices: DevicesOption = 1,
    max_restarts: MaxRestartsOption = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json as one JSON object.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the live progress bar.")] = True,
) -> None:
    """Learn features from unlabelled files (contrastive views for images and audio, masked tokens for text)."""
    from layerwise.pretrain import MIN_BATCH, pretrain, print_pretrain
    from layerwise.training.distributed import process_group_from_env

    group = process_group_from_env()
    if devices > 1 and batch_size is not None and batch_size < MIN_BATCH * devices:  # refused once, before launch
        raise InputError(f"--batch-size {batch_size} over {devices} processes leaves each fewer than {MIN_BATCH} "
                         f"inputs a batch; give --batch-size {MIN_BATCH * devices} or more")  # fmt: skip
    resume = launch_or_resume(group, out, resume, device, precision, devices, max_restarts)
    bundle = pretrain(
        data, out, modality=modality, model=model, epochs=epochs, time_budget=time_budget, seed=seed,
        batch_size=batch_size, probe=probe, resume=resume, device=device, precision=precision, compile=compile_model,
        show_progress=progress and not as_json,
    )  # fmt: skip
    if not group.writes_run:
        return
    if as_json:
        print(json.dumps(bundle.summary))
        return
    print_pretrain(bundle.summary, out_console, out)


@app.command("evaluate")
@exits_cleanly
def evaluate_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    data: Annotated[Path, typer.Argument(help="Labelled data: a class-folder tree or CSV manifest.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Metrics of a trained run on labelled data (for fold runs: structure files, with both baselines)."""
    from layerwise.bundle import load

    metrics, problems = load(run).evaluate(data)
    for problem in problems:
        err_console.print(f"skipped {problem.origin}: {problem.reason}", highlight=False, markup=False, soft_wrap=True)
    if as_json:
        print(json.dumps(metrics | {"skipped": len(problems)}))
        return
    for name, value in metrics.items():
        out_console.print(f"{name:>14}: {value:.4f}" if isinstance(value, float) else f"{name:>14}: {value}")
    if problems:
        out_console.print(f"{'skipped':>14}: {len(problems)}")


def print_skipped(problems) -> None:
    for problem in problems[:20]:
        err_console.print(f"skipped {problem.origin}: {problem.reason}", highlight=False, markup=False, soft_wrap=True)
    if len(problems) > 20:
        err_console.print(f"... and {len(problems) - 20} more skipped", highlight=False)


@app.command("detect")
@exits_cleanly
def detect_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train --task detect`.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files, or folders searched recursively.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="A folder for one picture per input with its boxes drawn.")
    ] = None,
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Report boxes with at least this confidence.")
    ] = 0.3,
    as_json: Annotated[
        bool, typer.Option("--json", help='One JSON object per image: {"path", "width", "height", "boxes"}.')
    ] = False,
    single_view: Annotated[
        bool,
        typer.Option(
            "--single-view",
            help="One pass at the run's inference side, without the test-time views its validation chose (about "
            "3x faster than four views; see inference_views in metrics.json).",
        ),
    ] = False,
) -> None:
    """Find and label the objects in images: boxes in the original images' pixels, with confidences."""
    from layerwise.bundle import load

    bundle = load(run)
    bundle.require("detect")
    if single_view:
        bundle.network.set_inference_views(None)
    detections, problems = bundle.task.detect(bundle.network, list(inputs), threshold=threshold)
    for problem in problems:
        print_result(problem, as_json)
    for detection in detections:
        print(json.dumps(detection.to_json()) if as_json else detection.to_line(), flush=True)
    if out is not None:
        from layerwise.serve.draw import write_detection_pictures

        written = write_detection_pictures(detections, out)
        err_console.print(f"wrote {len(written)} picture(s) to {out}", highlight=False)
    if problems:
        raise typer.Exit(2)


@app.command("fold")
@exits_cleanly
def fold_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train --task fold`.")],
    inputs: Annotated[list[str], typer.Argument(help="Amino-acid sequences, or FASTA files (one chain per record).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="A folder for NAME.pdb (Cα, pLDDT as B-factor) and NAME.png (distance map)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='One JSON object per chain: {"name", "sequence", "plddt_mean", "pdb"}.')
    ] = False,
) -> None:
    """Fold sequences into Cα structures with a per-residue confidence (pLDDT)."""
    from layerwise.bundle import load

    bundle = load(run)
    bundle.require("fold")
    results, problems = bundle.task.fold(bundle.network, inputs, out)
    for problem in problems:
        print_result(problem, as_json)
    for result in results:
        print(json.dumps(result.to_json()) if as_json else result.to_line(), flush=True)
    if problems:
        raise typer.Exit(2)


@app.command("transcribe")
@exits_cleanly
def transcribe_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train --task transcribe`.")],
    inputs: Annotated[list[Path], typer.Argument(help="Audio files (wav/flac/ogg, any rate), or folders of them.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='One JSON object per file: {"path", "text", "language", "language_confidence", '
            '"seconds_of_audio", "real_time_factor"}.',
        ),
    ] = False,
    language: Annotated[
        str | None, typer.Option("--language", help="Force the language (an ISO 639-1 code the run was trained on).")
    ] = None,
    beam_size: Annotated[int, typer.Option("--beam-size", help="1: greedy decoding; more: beam search.")] = 1,
) -> None:
    """Transcribe recordings of any length (cut at silences), detecting the language unless --language forces it."""
    from layerwise.bundle import load

    bundle = load(run)
    bundle.require("transcribe")
    examples, problems = bundle.task.find_inputs(inputs)
    failed = sum(print_result(problem, as_json) for problem in problems)
    for item in bundle.task.transcribe_examples(bundle.network, examples, language, beam_size):
        failed += print_result(item, as_json)
    if failed:
        raise typer.Exit(2)


@app.command("shift")
@exits_cleanly
def shift_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    data: Annotated[
        Path,
        typer.Argument(
            help="New inputs: a flat folder of files (unlabelled), or class folders / a CSV manifest (then the true "
            "accuracy is printed beside the estimate). With --fit-reference: labelled held-out data."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    fit_reference: Annotated[
        bool,
        typer.Option(
            "--fit-reference",
            help="Instead of testing: calibrate the run and store its shift reference from DATA (labelled data the "
            "run was not trained on), for runs trained without one.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the permutation test and the subsample.")] = 0,
) -> None:
    """Has the data changed since training? Two-sample tests on the network's embeddings, and the accuracy
    estimated without labels."""
    from layerwise.bundle import load

    bundle = load(run)
    if fit_reference:
        n = bundle.fit_shift_reference(data, run)
        calibration = bundle.task.calibration
        message = {"reference_examples": n, **calibration}
        if as_json:
            print(json.dumps(message))
        else:
            out_console.print(
                f"shift reference fitted on {n} examples of {data} and written to {run}; temperature "
                f"{calibration['temperature']:.3f} (calibration error {calibration['ece_before']:.4f} -> "
                f"{calibration['ece_after']:.4f})",
                highlight=False,
                soft_wrap=True,
            )
        return
    result, problems = bundle.shift(data, seed=seed)
    print_skipped(problems)
    if as_json:
        print(json.dumps(result.to_json() | {"skipped": len(problems)}))
        return
    verdict = "[red]shift detected[/]" if result.shift_detected else "[green]no shift detected[/]"
    lines = [
        f"{verdict}: p = {result.p_value:.3g} (level 0.01) on {result.n} inputs",
        f"  MMD² {result.mmd_squared:.4g}, permutation p {'≤' if result.mmd_p_value <= 1 / 501 else '='} "
        f"{result.mmd_p_value:.3g}; effect size (MMD) "
        f"{result.effect_size:.3f}",
        f"  Kolmogorov–Smirnov: {result.dimensions_shifted}/{result.dimensions} embedding dimensions shifted "
        f"(Benjamini–Hochberg), smallest corrected p = {result.ks_p_value:.3g}",
        f"  estimated accuracy without labels: {result.estimated_accuracy:.1%}"
        + ("" if result.estimate_error is None else f" (typical error ±{100 * result.estimate_error:.0f} points)")
        + f"; validation accuracy {result.reference_accuracy:.1%}"
        + ("" if result.accuracy is None else f"; true accuracy on these labels: {result.accuracy:.1%}"),
        f"  out-of-distribution inputs: {result.ood_fraction:.1%} (about 5% on data like the validation split)",
    ]
    for line in lines:
        out_console.print(line, highlight=False, soft_wrap=True)


@app.command("robustness")
@exits_cleanly
def robustness_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    data: Annotated[Path, typer.Argument(help="Labelled data the run was not trained on (class folders or CSV).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="A folder to write robustness.png and robustness.json into.")
    ] = None,
    max_examples: Annotated[
        int, typer.Option("--max-examples", min=10, help="A seeded random sample of at most this many inputs.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the sample and of the random corruptions.")] = 0,
) -> None:
    """The run's accuracy under corruptions of its modality (dusk, noise, blur, ...; a phone line; typos) at 5
    severities."""
    from layerwise.bundle import load
    from layerwise.shift.robustness import robustness_png, robustness_table

    result, problems = load(run).robustness(data, max_examples=max_examples, seed=seed)
    print_skipped(problems)
    if out is not None:
        from layerwise.files import write_atomic, write_json

        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "robustness.png", robustness_png(result))
        write_json(out / "robustness.json", result)
        err_console.print(f"wrote {out / 'robustness.png'} and {out / 'robustness.json'}", highlight=False)
    if as_json:
        print(json.dumps(result))
        return
    header, *rows = robustness_table(result)
    table = Table(title=f"accuracy on {result['n']} inputs under corruption")
    for i, name in enumerate(header):
        table.add_column(name, no_wrap=True, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    out_console.print(table)
    out_console.print(f"mean over corruptions: {result['mean_corrupted']:.1%} (clean {result['clean']:.1%})")


@app.command("curve")
@exits_cleanly
def curve_command(
    data: Annotated[Path, typer.Argument(help="Labelled classification data: class folders or a CSV manifest.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for curve.json, curve.png and report.html.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (the content of curve.json) and nothing else.")
    ] = False,
    target: Annotated[
        float | None, typer.Option(help="A validation accuracy to estimate the labels needed for, e.g. 0.9.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Registered model name (default: chosen from the data).")] = None,
    modality: Annotated[str | None, typer.Option(help="image, audio or text (default: detected).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the split, subsets and training. [default: 0]")] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Fraction held out for validation. [default: 0.1]")
    ] = None,
    time_budget: Annotated[
        float | None,
        typer.Option("--time-budget", help="Training seconds for all 5 points, shared by size. [default: 300]"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs per point. [default: 30]")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Reuse the points already in --out (finish it, or re-estimate).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a learning curve already in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the live progress bar while training.")] = True,
) -> None:
    """Would more labels help? Deep and classical accuracy at 5 nested fractions of the labels, a power-law fit,
    and the labels a target accuracy needs."""
    from layerwise.curve import learning_curve, print_curve

    curve = learning_curve(
        data, out, modality=modality, model=model, seed=seed, val_fraction=val_fraction, epochs=epochs,
        time_budget=time_budget, target=target, resume=resume, overwrite=overwrite,
        show_progress=progress and not as_json,
    )  # fmt: skip
    if as_json:
        print(json.dumps(curve))
        return
    print_curve(curve, out_console, out)


@app.command("adapt")
@exits_cleanly
def adapt_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    data: Annotated[Path, typer.Argument(help="Inputs from the new conditions; labels are optional.")],
    out: Annotated[Path, typer.Option("--out", help="The new run directory to write (must not hold a run).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Adapt a run to new conditions from unlabelled inputs (BatchNorm statistics, or TENT); writes a new run."""
    from layerwise.shift.adapt import adapt_run

    report = adapt_run(run, data, out)
    if as_json:
        print(json.dumps(report))
        return
    out_console.print(
        f"adapted with {report['method']} on {report['n']} inputs; wrote {out}", highlight=False, soft_wrap=True
    )
    if report["accuracy_before"] is not None:
        out_console.print(
            f"accuracy on {data}: {report['accuracy_before']:.1%} before, {report['accuracy_after']:.1%} after",
            highlight=False,
        )


@app.command("predict")
@exits_cleanly
def predict_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Files, or folders searched recursively. For a text run a string that does not look like a path "
            "(no path separator, no file extension) is also taken as text; prefer --text."
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text", help="A raw text to classify (text runs; repeatable; '-' reads one per line from stdin)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many classes to list per input.")] = 3,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write JSON lines to FILE as they are produced (with a progress bar)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="With --out: skip inputs already written to FILE, append the rest.")
    ] = False,
) -> None:
    """Predict each input file (or --text). Undecodable inputs are reported and make the exit code 2.

    A directory of any size streams through in chunks; with --out the lines go to FILE as they are made.
    """
    from layerwise.bundle import load

    texts = read_texts(text)
    if not inputs and not texts:
        raise InputError("predict: give at least one file or folder, or --text")
    if resume and out is None:
        raise InputError("--resume needs --out FILE (the predictions written so far)")
    bundle = load(run)
    bundle.require("predict")
    examples, problems = bundle.find_inputs(list(inputs or []), texts)  # problems: found but unusable here
    if out is None:
        failed = sum(print_result(problem, as_json) for problem in problems)
        for result in bundle.task.predict_stream(bundle.network, examples, top_k):
            failed += print_result(result, as_json)
    else:
        if out.exists() and out.stat().st_size > 0 and not resume:
            raise InputError(f"--out {out}: already exists; pass --resume to continue it or choose another file")
        done = written_paths(out) if resume else set()
        todo = [example for example in examples if example.origin not in done]
        problems = [problem for problem in problems if problem.origin not in done]
        if resume:
            err_console.print(f"{len(examples) - len(todo)} input(s) already in {out}; {len(todo)} to go")
        failed = stream_predictions(bundle, todo, problems, top_k, out)
    if failed:
        raise typer.Exit(2)


def print_result(result, as_json: bool) -> int:
    """One prediction or problem on stdout (problems also on stderr); returns 1 for a problem."""
    if hasattr(result, "reason"):
        if as_json:
            print(json.dumps({"path": result.origin, "error": result.reason}), flush=True)
        err_console.print(f"error: {result.origin}: {result.reason}", highlight=False, markup=False, soft_wrap=True)
        return 1
    print(json.dumps(result.to_json()) if as_json else result.to_line(), flush=True)
    return 0


def written_paths(path: Path) -> set[str]:
    """The "path" of every complete JSON line already in `path`; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return {json.loads(line)["path"] for line in complete.splitlines() if line.strip()}


def stream_predictions(bundle, examples, problems, top_k: int, out: Path) -> int:
    """Append one JSON line per input to `out` as predictions are made, with a progress bar; returns failures."""
    import itertools

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    failed = 0
    results = itertools.chain(problems, bundle.task.predict_stream(bundle.network, examples, top_k))
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with open(out, "a", encoding="utf-8") as f, Progress(*columns, console=err_console) as progress:
        bar = progress.add_task("predict", total=len(examples) + len(problems))
        for i, result in enumerate(results, 1):
            if hasattr(result, "reason"):
                f.write(json.dumps({"path": result.origin, "error": result.reason}) + "\n")
                failed += 1
            else:
                f.write(json.dumps(result.to_json()) + "\n")
            progress.advance(bar)
            if i % 256 == 0:
                f.flush()  # a killed run loses at most the last few lines; --resume redoes them
    n = len(examples) + len(problems)
    err_console.print(f"wrote {n} line(s) to {out} ({failed} could not be read)", highlight=False)
    return failed


@app.command("generate")
@exits_cleanly
def generate_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train --task generate`.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue ('-' reads it from stdin).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Sample among the K likeliest tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Sample among the likeliest tokens holding P of the mass.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (the same seed gives the same text).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
) -> None:
    """Continue a prompt with a trained language model, streaming the text as it is produced."""
    from layerwise.bundle import load

    if prompt == "-":
        prompt = sys.stdin.read()
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], not {top_p}")
    bundle = load(run)
    bundle.require("generate")

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    note = lambda message: err_console.print(message, highlight=False, markup=False)  # noqa: E731
    result = bundle.generate(
        prompt, max_new_tokens, temperature, top_k=top_k, top_p=top_p, seed=seed,
        on_text=None if as_json else stream, log=note,
    )  # fmt: skip
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print()
        err_console.print(
            f"{result.new_tokens} tokens in {result.seconds:.2f} s ({result.to_json()['tokens_per_second']} tokens/s)",
            highlight=False,
        )


@app.command("export")
@exits_cleanly
def export_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write (model.onnx); FILE.json goes beside it.")],
    export_format: Annotated[
        str, typer.Option("--format", help="onnx (every registered model exports to it).")
    ] = "onnx",
    data: Annotated[
        Path | None, typer.Option("--data", help="Real inputs for the parity check (default: the run's own data).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Export the network to ONNX (dynamic batch, and sequence length for tokens), checked against PyTorch."""
    from layerwise.bundle import load
    from layerwise.serve.export import PARITY_TOLERANCE, export_onnx

    if export_format != "onnx":
        raise InputError(f"--format {export_format!r}: only onnx is supported (every registered model exports to it)")
    result = export_onnx(load(run), out, data)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        out_console.print(
            f"wrote {result.path} and {result.spec_path}; onnxruntime vs PyTorch on {result.parity_inputs}: "
            f"max abs difference {result.max_abs_difference:.2e} (tolerance {PARITY_TOLERANCE:g})",
            highlight=False,
        )
    if result.max_abs_difference > PARITY_TOLERANCE:
        err_console.print("[red]error:[/] the exported model does not match PyTorch within the tolerance")
        raise typer.Exit(1)


@app.command("serve")
@exits_cleanly
def serve_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you say otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Inputs run through the network together.")] = 32,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms",
            help="How long a request waits for others to share its batch (0: a batch is what arrived meanwhile).",
        ),
    ] = 0.0,
    max_inputs: Annotated[int, typer.Option("--max-inputs", help="Files or texts allowed in one request.")] = 64,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body, in MB.")] = 16.0,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take before a 504.")] = 30.0,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="A file holding the key every request but /health must send.")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (each loads the model once).")] = 1,
    threads: Annotated[
        int | None, typer.Option(help="PyTorch threads per process (default: the cores left after each event loop).")
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            help="auto: classifiers on ONNX Runtime when their export matches PyTorch (2-3x faster on CPU), "
            "else PyTorch; onnx: require it; torch: always PyTorch."
        ),
    ] = "auto",
) -> None:
    """Serve a run over HTTP: POST /predict, POST /generate, GET /model, GET /health, docs at /docs."""
    import dataclasses
    import tempfile

    import uvicorn

    from layerwise.bundle import load
    from layerwise.serve.app import ServeConfig, create_app, inference_threads

    api_key = None
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except OSError as err:
            raise InputError(f"--api-key-file {api_key_file}: cannot read it ({err.strerror})") from err
        if not api_key:
            raise InputError(f"--api-key-file {api_key_file}: empty")
    config = ServeConfig(
        max_batch, max_wait_ms, int(max_body_mb * (1 << 20)), max_inputs, timeout, api_key,
        threads or inference_threads(workers),
    )  # fmt: skip
    if runtime not in ("auto", "onnx", "torch"):
        raise InputError(f"--runtime {runtime!r}: choose auto, onnx or torch")
    bundle = load(run)  # fails here, with a clear message, before any worker starts
    exported = tempfile.TemporaryDirectory(prefix="layerwise-serve-onnx-")  # removed when the server stops
    if runtime != "torch":
        from layerwise.serve.onnx_network import export_for_serving

        onnx_model = Path(exported.name) / "model.onnx"
        reason = export_for_serving(bundle, onnx_model)
        if reason is None:
            config = dataclasses.replace(config, onnx_model=str(onnx_model))
        elif runtime == "onnx":
            raise InputError(f"--runtime onnx: {reason}")
        err_console.print(
            f"serving on {'ONNX Runtime' if reason is None else 'PyTorch'}" + (f": {reason}" if reason else ""),
            highlight=False,
        )
    if workers == 1:
        uvicorn.run(create_app(bundle, config, run), host=host, port=port, log_level="warning")
        return
    import os

    from layerwise.serve.app import SETTINGS_ENV

    os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(config) | {"run": str(run.resolve())})
    uvicorn.run(
        "layerwise.serve.app:app_from_env", factory=True, workers=workers, host=host, port=port, log_level="warning"
    )


@app.command("demo")
@exits_cleanly
def demo_command(
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/demo-<time>).")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Where the PNG folders are prepared (default: ~/.cache/layerwise)."),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option("--time-budget", help="Training seconds (default: 480 classify, 300 generate).")
    ] = None,
    download: Annotated[
        bool, typer.Option(help="Download Fashion-MNIST with torchvision if the Debian package is absent.")
    ] = False,
    task: Annotated[
        str, typer.Option(help="classify: Fashion-MNIST; generate: a GPT on Jane Austen's novels.")
    ] = "classify",
) -> None:
    """The embedded default: Fashion-MNIST classification, or (--task generate) a language model of Austen."""
    from layerwise.demo import DEMOS

    if task not in DEMOS:
        raise InputError(f"--task: the demo exists for {', '.join(DEMOS)}, not {task!r}")
    DEMOS[task](out=out, data_dir=data_dir, time_budget=time_budget, download=download)


@app.command("models")
def models_command(modality: Annotated[str | None, typer.Option(help="Only models for this modality.")] = None) -> None:
    """List the registered models."""
    from layerwise.models.registry import list_models, model_entry

    for name in list_models(modality):
        entry = model_entry(name)
        print(f"{name}\t{', '.join(entry.modalities)}\t{', '.join(entry.tasks)}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


@app.command("explain")
@exits_cleanly
def explain_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Files or folders (searched recursively). For a text run a string that does not look like a path "
            "(no path separator, no file extension) is also taken as text; prefer --text."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the pictures and explanations.json.")] = ...,
    text: Annotated[
        list[str] | None,
        typer.Option(
            "--text", help="A raw text to explain (text runs; repeatable; '-' reads one per line from stdin)."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="ig (Integrated Gradients), gradcam (Grad-CAM) or both.")] = "both",
    target: Annotated[
        str | None, typer.Option(help="Class name (or index) to explain (default: each input's predicted class).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with the raw scores.")] = False,
    box: Annotated[
        int, typer.Option("--box", min=1, help="Detect runs: explain each image's N-th most confident box.")
    ] = 1,
) -> None:
    """Why each prediction was made: attribution maps drawn over the input (or highlighted tokens for text);
    for a detect run, which pixels drove a chosen box (Grad-CAM on its score)."""
    from layerwise.bundle import load
    from layerwise.explain.run import resolve_methods

    methods = resolve_methods(method)
    texts = read_texts(text)
    if not inputs and not texts:
        raise InputError("explain: give at least one file or folder, or --text")
    bundle = load(run)
    bundle.require("explain")
    document, problems, lines = bundle.task.explain(
        bundle, list(inputs or []), out, methods=methods, target=target, texts=texts, box=box
    )
    for problem in problems:
        err_console.print(f"error: {problem.origin}: {problem.reason}", highlight=False, markup=False, soft_wrap=True)
    if as_json:
        print(json.dumps(document))
    else:
        for line in lines:
            print(line)
    if problems:
        raise typer.Exit(2)


@app.command("layers")
@exits_cleanly
def layers_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `layerwise train`.")],
    data: Annotated[Path, typer.Argument(help="Labelled data: a class-folder tree or CSV manifest.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for layers.html, its figures and layers.json.")],
    max_examples: Annotated[
        int, typer.Option("--max-examples", min=4, help="Examples analysed (half fit the probes, half score them).")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed for the sample and the probe split.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the probe accuracies.")] = False,
) -> None:
    """What each layer learned: linear probes per stage, first-layer filters, top-activating inputs, a 2-D map."""
    from layerwise.bundle import load
    from layerwise.explain.run import analyse_data, write_layers

    bundle = load(run)
    bundle.require("layers")
    analysis, problems = analyse_data(bundle, data, max_examples, seed)
    document = write_layers(analysis, bundle, out, {"data": str(data), "skipped": len(problems)})
    if as_json:
        print(json.dumps(document))
        return
    title = f"linear probes ({analysis.n_fit} fit / {analysis.n_score} scored; chance {analysis.chance:.1%})"
    table = Table(title=title)
    for column in ("depth", "stage", "output shape", "probe accuracy"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for probe in analysis.probes:
        shape = "x".join(map(str, probe.shape))
        table.add_row(str(probe.depth), escape(probe.name), shape, f"{probe.accuracy:.1%}")
    out_console.print(table)
    out_console.print(f"wrote {out / 'layers.html'} and {out / 'layers.json'}", highlight=False)
