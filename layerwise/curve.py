"""`layerwise curve`: would more labels help? Deep and classical accuracy at 5 nested fractions of the labels.

The data is prepared once through the classify task (one validation split, one front end), so every point is
scored on the same validation examples. Each point trains a fresh network with the real training loop and fits
the classical baseline on the same nested, stratified subset of the training split. A power law of the error
against the number of labels, error(n) = a·n^(-b) + c, turns the five points into an answer: is the curve still
falling at the largest n, about how many labels a target accuracy needs, and where the deep model would overtake
the classical one.

The front end (image statistics, text tokenizer, audio length) is fitted once on the whole training split. It
uses no labels, so each point stands for a user with that many labels among all the unlabelled files.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from layerwise import __version__
from layerwise.errors import InputError
from layerwise.files import write_atomic, write_json

FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # each point doubles the labels of the one before
FRACTION_NAMES = ("1/16", "1/8", "1/4", "1/2", "all")
DEFAULT_TIME_BUDGET = 300.0  # seconds of training for the whole curve: minutes on 2 CPU cores
MEANINGFUL_GAIN = 0.005  # accuracy a doubling of the labels must add for "more labels would help" (half a point)
MAX_LABELS = 1e9  # estimates beyond this many labels are reported as out of reach
MAX_EXPONENT = 3.0  # b above 3 would mean the error falls faster than 1/n³: not a learning curve, an artefact
EXTRAPOLATION_NOTE = 4  # an estimate beyond this multiple of the largest n is called rough in the verdict
CURVE_FILE, PARTIAL_FILE, PNG_FILE, REPORT_FILE = "curve.json", "curve.partial.json", "curve.png", "report.html"
console = Console(stderr=True)


def say(message: str) -> None:
    """Progress on stderr, so that `--json` output on stdout stays one document."""
    console.print(message, soft_wrap=True, highlight=False, markup=False)


@dataclass(frozen=True)
class CurveSettings:
    """What the points depend on (all fixed on --resume); `target` only changes the estimate."""

    modality: str | None = None
    model: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    epochs: int = 30
    time_budget: float = DEFAULT_TIME_BUDGET  # training seconds for all five points together
    target: float | None = None  # an accuracy in (0, 1)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 0.5:
            raise InputError(f"--val-fraction must be between 0 and 0.5, not {self.val_fraction}")
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, not {self.epochs}")
        if not self.time_budget > 0:
            raise InputError(f"--time-budget must be positive, not {self.time_budget}")
        if self.target is not None and not 0 < self.target < 1:
            raise InputError(f"--target is an accuracy between 0 and 1 (e.g. 0.9), not {self.target}")

    def points_key(self) -> dict:
        """The settings a point's result depends on: a resumed curve must match them."""
        return {k: v for k, v in asdict(self).items() if k != "target"}


# ---------------------------------------------------------------------- the power law


@dataclass(frozen=True)
class PowerLaw:
    """error(n) = a·n^(-b) + c for n labels; `c` is the error the curve levels off at (0 when not identifiable)."""

    a: float
    b: float
    c: float
    method: str  # "three-parameter" or "log-log"
    rmse: float  # of log(error): 0.1 means the points sit about 10% off the fitted error

    def error(self, n: float | np.ndarray) -> np.ndarray:
        return self.a * np.asarray(n, dtype=np.float64) ** -self.b + self.c

    @property
    def floor(self) -> float:
        """The error the fitted curve levels off at: c, or the whole error of a flat curve (b = 0)."""
        return self.c if self.b > 0 and self.a > 0 else self.a + self.c

    def labels_for_error(self, error: float) -> float:
        """The n at which the fitted error falls to `error`; inf when it never does."""
        if error <= self.c or self.a <= 0 or self.b <= 0:
            return 0.0 if error >= self.a + self.c else math.inf  # a flat curve: reached at once or never
        return (self.a / (error - self.c)) ** (1 / self.b)

    def to_json(self) -> dict:
        formula = f"error = {self.a:.4g}·n^-{self.b:.3g} + {self.c:.3g}"
        return {"a": self.a, "b": self.b, "c": self.c, "asymptote": 1 - self.floor, "method": self.method,
                "rmse_log_error": self.rmse, "formula": formula}  # fmt: skip


def fit_power_law(n: np.ndarray | list, error: np.ndarray | list) -> PowerLaw:
    """Fit error = a·n^(-b) + c to points (n, error), error > 0, by least squares on log(error).

    Log space because a learning curve's errors span an order of magnitude and its noise is roughly relative.
    Five noisy points rarely pin down three parameters: the asymptote c is kept only when the three-parameter
    fit determines each parameter better than its own size (standard error below the value); otherwise the
    two-parameter log-log line (c = 0: the error keeps falling, no floor seen in the points) is used, and
    `method` says which.
    """
    n, error = np.asarray(n, dtype=np.float64), np.asarray(error, dtype=np.float64)
    if len(n) < 3 or np.any(n <= 0) or np.any(error <= 0):
        raise ValueError("a power law needs at least 3 points with positive n and error")
    line = _fit_log_log(n, error)
    three = _fit_three(n, error, line)
    return three if three is not None else line


def _fit_log_log(n: np.ndarray, error: np.ndarray) -> PowerLaw:
    """log(error) = log(a) - b·log(n); a rising error (noise) is read as a flat curve (b = 0)."""
    slope = np.polyfit(np.log(n), np.log(error), 1)[0]
    b = min(max(-float(slope), 0.0), MAX_EXPONENT)
    log_a = float(np.mean(np.log(error) + b * np.log(n)))  # the least-squares intercept for this b
    rmse = float(np.sqrt(np.mean((log_a - b * np.log(n) - np.log(error)) ** 2)))
    return PowerLaw(math.exp(log_a), b, 0.0, "log-log", rmse)


def _fit_three(n: np.ndarray, error: np.ndarray, line: PowerLaw) -> PowerLaw | None:
    from scipy.optimize import OptimizeWarning, curve_fit

    # Amplitude at the geometric mean n0 of the points, not at n = 1 far outside them: A and b are then
    # nearly uncorrelated and the covariance says how well each is determined.
    n0 = float(np.exp(np.mean(np.log(n))))
    smallest = float(error.min())

    def log_model(x, amplitude, b, c):
        return np.log(amplitude * (x / n0) ** -b + c)

    start = [max(float(line.error(n0)) / 2, 1e-6), max(line.b, 0.2), smallest / 2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            params, covariance = curve_fit(
                log_model, n, np.log(error), p0=start, bounds=([1e-12, 0.0, 0.0], [np.inf, MAX_EXPONENT, smallest]),
                maxfev=20_000,
            )  # fmt: skip
    except (RuntimeError, ValueError):
        return None
    amplitude, b, c = (float(v) for v in params)
    stderr = np.sqrt(np.diag(covariance))
    determined = bool(np.all(np.isfinite(stderr))) and stderr[0] < amplitude and stderr[1] < b and stderr[2] < c
    if not determined or c >= 0.999 * smallest:  # c pinned at the lowest point is the bound talking, not the data
        return None
    rmse = float(np.sqrt(np.mean((log_model(n, amplitude, b, c) - np.log(error)) ** 2)))
    return PowerLaw(amplitude * n0**b, b, c, "three-parameter", rmse)


# ---------------------------------------------------------------------- subsets


def nested_subsets(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Indices (sorted) of nested, stratified subsets: per class, the first ceil(f·n_class) of one seeded shuffle.

    Every class keeps at least one example in the smallest subset, and each subset contains the one before.
    """
    generator = torch.Generator().manual_seed(seed)
    shuffled = [
        members[torch.randperm(len(members), generator=generator)]
        for members in (torch.nonzero(labels == k).flatten() for k in torch.unique(labels).tolist())
    ]
    return [
        torch.cat([members[: max(1, math.ceil(f * len(members)))] for members in shuffled]).sort().values
        for f in fractions
    ]


# ---------------------------------------------------------------------- the curve


def learning_curve(
    data: str | Path,
    out: str | Path | None = None,
    *,
    modality: str | None = None,
    model: str | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    epochs: int | None = None,
    time_budget: float | None = None,
    target: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    log=say,
) -> dict:
    """The learning curve of classification data `data`; writes curve.json, curve.png and report.html into `out`.

    Options left as None take their defaults or, with `resume=True`, the values of the curve in `out`, whose
    finished points are reused (so `resume` with a new `target` only re-estimates).
    """
    from layerwise.api import check_writable, report_problems
    from layerwise.tasks.base import FitOptions
    from layerwise.tasks.classify import ClassifyTask

    started = time.perf_counter()
    given = {"modality": modality, "model": model, "seed": seed, "val_fraction": val_fraction, "epochs": epochs,
             "time_budget": time_budget, "target": target}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    out_dir = Path(out) if out is not None else None
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other; give one")
    previous = existing_curve(out_dir, resume, overwrite)  # refusals first: nothing is touched before them
    settings = resumed_settings(previous, given) if previous else CurveSettings(**given)
    if out_dir is not None:
        check_writable(out_dir)
    data = Path(data)
    check_classification(data)

    options = FitOptions(settings.modality, settings.model, settings.seed, settings.val_fraction)
    prepared = ClassifyTask.prepare(data, options, log=log)
    report_problems(prepared.problems)
    subsets = nested_subsets(prepared.extras["train_labels"], FRACTIONS, settings.seed)
    check_distinct(subsets, prepared, data)
    points = previous["points"] if previous else []
    if previous and previous.get("model") not in (None, prepared.model_name):
        raise InputError(
            f"--resume: the curve in {out_dir} trained {previous['model']}, this one would train "
            f"{prepared.model_name}; resume with --model {previous['model']}, or --overwrite"
        )
    if previous and previous["data"]["fingerprint"] != prepared.data_summary["fingerprint"]:
        raise InputError(
            f"--resume: {data} no longer matches the curve in {out_dir} (its usable examples or split differ); "
            "resume with the same data, or --overwrite"
        )
    header = curve_header(settings, prepared, data)
    for i, (fraction, index) in enumerate(zip(FRACTIONS, subsets, strict=True)):
        if i < len(points):
            if points[i]["n"] != len(index):  # the same data, seed and split give the same subsets; anything else
                raise InputError(f"--resume: point {i + 1} of the curve in {out_dir} has {points[i]['n']} labels, "
                                 f"not {len(index)}; start over with --overwrite")  # fmt: skip
            log(f"point {i + 1}/5 ({len(index):,} labels): reused from the curve in {out_dir}")
            continue
        budget = point_budget(settings.time_budget, points, [len(s) for s in subsets[i:]])
        point = train_point(prepared, index, fraction, settings, budget, show_progress, log, done=len(points))
        points.append(point)
        log(
            f"point {i + 1}/5 ({point['n']:,} labels): deep {point['deep']:.1%} ({point['deep_seconds']:.1f} s, "
            f"{point['epochs']} epochs), classical {point['classical']:.1%} ({point['classical_seconds']:.1f} s)"
        )
        if out_dir is not None:
            write_json(out_dir / PARTIAL_FILE, header | {"points": points})  # a crash keeps the finished points
    curve = header | summarise(points, settings.target, prepared.data_summary["n_val"])
    curve["seconds"] = round(time.perf_counter() - started, 1)
    if out_dir is not None:
        write_curve(out_dir, curve)
    return curve


def point_budget(total: float, done: list[dict], sizes_left: list[int]) -> float:
    """Training seconds for the next point (the first of `sizes_left`): its share by size of what is left.

    In proportion to size, every point gets about the same number of epochs, so the curve measures labels, not
    compute; what a smaller point left unused (it ran all its epochs or stopped early) goes to the larger ones.
    """
    left = max(total - sum(p["deep_seconds"] for p in done), 0.0)
    return max(left * sizes_left[0] / sum(sizes_left), 1.0)  # a second at least: one epoch of a tiny point


def check_classification(data: Path) -> None:
    """Only classification data has a learning curve here; anything else is refused before it is read."""
    from layerwise.data.shards import is_shard_folder
    from layerwise.tasks import detect_task

    if not data.exists():
        raise InputError(f"{data}: no such file or directory")
    if is_shard_folder(data):  # its in-memory part is a sample: "all the labels" would not be all of them
        raise InputError(f"{data}: packed shards; give `layerwise curve` the raw data they were packed from")
    task = detect_task(data)
    if task != "classify":
        raise InputError(
            f"{data}: looks like {task} data; `layerwise curve` measures classification (class folders, or a CSV "
            "manifest with a 'label' column)"
        )


def train_point(prepared, index: torch.Tensor, fraction: float, settings: CurveSettings, budget: float,
                show_progress: bool, log, done: int) -> dict:  # fmt: skip
    """Train a fresh network and fit the classical baseline on the training examples `index`; score both."""
    from layerwise.api import seed_everything, transfer_schedule
    from layerwise.baseline import fit_baseline
    from layerwise.data.batches import TensorBatches
    from layerwise.models.registry import create_model, load_pretrained
    from layerwise.runtime import predict_logits
    from layerwise.tasks.base import default_batch_size
    from layerwise.tasks.classify import classification_metrics
    from layerwise.training.loop import TrainConfig, TrainingInterrupted, train

    extras, task = prepared.extras, prepared.task
    frontend = task.frontend
    inputs, labels = extras["train_inputs"][index], extras["train_labels"][index]
    seed_everything(settings.seed)  # the same initialisation for every point, whatever ran before
    network = create_model(prepared.model_name, **prepared.model_config)
    published = load_pretrained(prepared.model_name, network)  # e.g. minilm_l6, timm:NAME: as `fit` starts them
    if published is not None:
        log(published)
    batch = default_batch_size(len(index))  # small subsets still take several steps an epoch
    batches = TensorBatches(inputs, labels, batch, frontend.model_input, frontend.augment, shuffle=True,
                            seed=settings.seed)  # fmt: skip
    config = TrainConfig(
        epochs=settings.epochs, batch_size=batch, lr=prepared.lr, time_budget_s=budget, seed=settings.seed,
        **({"patience": prepared.patience} if prepared.patience else {}),
        **transfer_schedule(None, published is not None, None, None),
    )  # fmt: skip
    try:
        result = train(network, batches, prepared.val_batches, config, show_progress=show_progress, log=log,
                       objective=task)  # fmt: skip
    except TrainingInterrupted:
        kept = f"{done} finished point(s) are kept in {PARTIAL_FILE}" if done else "no point had finished"
        raise TrainingInterrupted(f"learning curve stopped during point {done + 1}/5; {kept}") from None
    logits, val_labels = predict_logits(network, prepared.val_batches)
    metrics = classification_metrics(logits, val_labels, len(task.class_names))
    baseline = fit_baseline(
        task.modality, frontend.baseline_features(inputs), labels.numpy(), val_features(prepared),
        extras["val_labels"].numpy(), seed=settings.seed,
    )  # fmt: skip
    return {
        "fraction": fraction, "n": len(index), "deep": metrics["accuracy"], "classical": baseline["accuracy"],
        "deep_macro_f1": metrics["macro_f1"], "deep_seconds": round(result.seconds, 2),
        "classical_seconds": baseline["seconds"], "epochs": len(result.history), "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
    }  # fmt: skip


def val_features(prepared) -> np.ndarray:
    """The classical baseline's validation features, computed once for all five points."""
    if "curve_val_features" not in prepared.extras:
        prepared.extras["curve_val_features"] = prepared.task.frontend.baseline_features(prepared.extras["val_inputs"])
    return prepared.extras["curve_val_features"]


def check_distinct(subsets: list[torch.Tensor], prepared, data: Path) -> None:
    """Five points need five different sizes; with very few examples per class the smallest ones coincide."""
    sizes = [len(s) for s in subsets]
    if len(set(sizes)) < len(sizes):
        n_classes = len(prepared.task.class_names)
        # 16 a class always gives 1, 2, 4, 8, 16; the validation split takes its share before that.
        needed = math.ceil(16 * n_classes / (1 - prepared.data_summary["val_fraction"]))
        raise InputError(
            f"{data}: {sizes[-1]} training examples in {n_classes} classes are too few for 5 nested learning-curve "
            f"points (the subsets would have {', '.join(map(str, sizes))} examples); give at least 16 training "
            f"examples per class (about {needed} labelled examples here)"
        )


def curve_header(settings: CurveSettings, prepared, data: Path) -> dict:
    """What every curve.json (and curve.partial.json) starts with: what was measured, on what, how."""
    summary = prepared.data_summary
    return {
        "metric": "accuracy",
        "data": {"source": summary["source"], "modality": prepared.task.modality, "classes": prepared.task.class_names,
                 "n_train": summary["n_train"], "n_val": summary["n_val"], "n_skipped": summary["n_skipped"],
                 "fingerprint": summary["fingerprint"]},
        "model": prepared.model_name,
        "classical_model": _classical_name(prepared.task.modality),
        "settings": asdict(settings),
        "layerwise_version": __version__,
    }  # fmt: skip


def _classical_name(modality: str) -> str:
    from layerwise.baseline import DESCRIPTIONS

    return DESCRIPTIONS[modality]


# ---------------------------------------------------------------------- resume and overwrite


def existing_curve(out_dir: Path | None, resume: bool, overwrite: bool) -> dict | None:
    """The curve already in `out_dir` to resume from; refuses to touch a run or an existing curve unasked."""
    if out_dir is None:
        if resume:
            raise InputError("--resume needs --out DIR (the curve to continue)")
        return None
    if (out_dir / "config.json").is_file() or (out_dir / "model.safetensors").is_file():
        raise InputError(f"--out {out_dir} holds a training run; write the learning curve to another folder")
    found = next((out_dir / name for name in (PARTIAL_FILE, CURVE_FILE) if (out_dir / name).is_file()), None)
    if found is None:
        if resume:
            raise InputError(f"--resume: {out_dir} holds no learning curve to resume (no {CURVE_FILE})")
        return None
    if overwrite:
        return None
    try:
        document = json.loads(found.read_text())
        n_done = len(document["points"])
        missing = [key for key in ("settings", "data") if not isinstance(document.get(key), dict)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{found}: not a learning curve written by layerwise ({err}); use --overwrite") from err
    if missing or "fingerprint" not in document["data"]:
        raise InputError(f"{found}: not a learning curve written by layerwise (no {missing or 'fingerprint'}); "
                         "use --overwrite")  # fmt: skip
    if not resume:
        state = "a learning curve" if n_done == len(FRACTIONS) else f"an unfinished curve ({n_done} of 5 points)"
        raise InputError(
            f"--out {out_dir} already holds {state}; pass --resume to reuse its points (e.g. with another --target), "
            "--overwrite to start over, or choose another --out"
        )
    return document


def read_finished_curve(path: str | Path) -> dict:
    """The finished curve in `path` (a `layerwise curve --out` folder, or its curve.json), for a run's report."""
    path = Path(path)
    file = path / CURVE_FILE if path.is_dir() else path
    if not file.is_file():
        unfinished = " (it holds an unfinished one: finish it with --resume)" if (path / PARTIAL_FILE).is_file() else ""
        raise InputError(f"--curve {path}: no finished learning curve there{unfinished}; make one with "
                         "`layerwise curve DATA --out DIR`")  # fmt: skip
    try:
        curve = json.loads(file.read_text())
        complete = len(curve["points"]) == len(FRACTIONS) and {"fit", "estimate", "verdict", "data"} <= set(curve)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--curve {file}: not a learning curve written by layerwise ({err})") from err
    if not complete:
        raise InputError(f"--curve {file}: not a finished learning curve written by layerwise")
    return curve


def resumed_settings(previous: dict, given: dict) -> CurveSettings:
    """The saved curve's settings with a new --target if given; any other changed option is refused."""
    names = {f.name for f in fields(CurveSettings)}
    saved = CurveSettings(**{k: v for k, v in previous["settings"].items() if k in names})
    changed = [k for k in saved.points_key() if k in given and given[k] != getattr(saved, k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the curve has {getattr(saved, k)})" for k in changed)
        raise InputError(f"--resume: {flags}; a resumed curve keeps its settings, only --target may change")
    return CurveSettings(**(asdict(saved) | {"target": given.get("target", saved.target)}))


# ---------------------------------------------------------------------- fit, estimate, verdict


def summarise(points: list[dict], target: float | None, n_val: int) -> dict:
    """The fits of both curves, the estimate drawn from them and the verdict sentence."""
    n = np.array([p["n"] for p in points], dtype=np.float64)
    floor = 0.5 / n_val  # a validation error of 0 means below one example in n_val: count it as half of one
    fits = {name: fit_power_law(n, np.maximum([1 - p[name] for p in points], floor)) for name in ("deep", "classical")}
    estimate = estimate_from(points, fits, target)
    return {
        "points": points,
        "fit": {name: law.to_json() for name, law in fits.items()},
        "estimate": estimate,
        "verdict": verdict(points, estimate),
        "notes": training_notes(points),
    }


def training_notes(points: list[dict]) -> list[str]:
    """Warnings the numbers need: a deep point stopped by the time budget while still improving is a lower bound."""
    cut = [
        name
        for name, point in zip(FRACTION_NAMES, points, strict=False)
        if point.get("stop_reason", "").startswith("time budget") and point.get("best_epoch") == point.get("epochs")
    ]
    if not cut:
        return []
    return [
        f"The deep model was still improving when the time budget stopped it (at {', '.join(cut)} of the labels), "
        "so its accuracy there is a lower bound; a larger --time-budget gives a fairer curve."
    ]


def estimate_from(points: list[dict], fits: dict[str, PowerLaw], target: float | None) -> dict:
    """Per model: the fitted gain from doubling the labels, the asymptote, the labels a `target` needs; and
    where the deep curve would overtake the classical one."""
    largest = points[-1]["n"]
    estimate: dict = {"largest_n": largest, "doubled_n": 2 * largest, "target": target}
    for name, law in fits.items():
        now, doubled = 1 - float(law.error(largest)), 1 - float(law.error(2 * largest))
        entry = {"fitted_at_largest": now, "gain_if_doubled": doubled - now, "asymptote": 1 - law.floor,
                 "more_labels_help": doubled - now >= MEANINGFUL_GAIN}  # fmt: skip
        if target is not None:
            entry |= labels_for_target(points, name, law, target)
        estimate[name] = entry
    estimate["more_labels_help"] = estimate["deep"]["more_labels_help"]
    gap = points[-1]["deep"] - points[-1]["classical"]
    estimate["leader_at_largest"] = "deep" if gap > 0 else "classical" if gap < 0 else "tie"
    estimate["deep_overtakes_classical_at"] = (
        overtaking_point(fits["deep"], fits["classical"], largest) if gap < 0 else None
    )
    return estimate


def labels_for_target(points: list[dict], name: str, law: PowerLaw, target: float) -> dict:
    """{"n_for_target", "target_status"}: reached (the smallest measured n that meets it), reachable (the fit's
    n), not reachable (the fit levels off below the target) or beyond the horizon (more than MAX_LABELS)."""
    met = [p["n"] for p in points if p[name] >= target]
    if met:
        return {"n_for_target": met[0], "target_status": "reached"}
    needed = law.labels_for_error(1 - target)
    if math.isinf(needed):
        return {"n_for_target": None, "target_status": "not reachable"}
    if needed > MAX_LABELS:
        return {"n_for_target": None, "target_status": "beyond the horizon"}
    # The fit may cross the target inside the measured range while no measured point did: then just beyond it.
    return {"n_for_target": max(math.ceil(needed), points[-1]["n"] + 1), "target_status": "reachable"}


def overtaking_point(deep: PowerLaw, classical: PowerLaw, start: float) -> int | None:
    """The smallest n >= `start` where the fitted deep accuracy reaches the classical one; None before MAX_LABELS."""
    grid = np.geomspace(start, MAX_LABELS, 2000)
    ahead = deep.error(grid) <= classical.error(grid)
    if not ahead.any():
        return None
    first = int(np.argmax(ahead))
    if first == 0:
        return int(start)
    low, high = math.log(grid[first - 1]), math.log(grid[first])
    for _ in range(50):  # bisection in log n between the last grid point behind and the first ahead
        middle = (low + high) / 2
        if deep.error(math.exp(middle)) <= classical.error(math.exp(middle)):
            high = middle
        else:
            low = middle
    return math.ceil(math.exp(high))


def about(n: float) -> str:
    """A label count rounded to two significant figures, as estimates deserve: 4,237 -> "about 4,200"."""
    if n < 100:
        return f"about {math.ceil(n)}"
    digits = int(math.floor(math.log10(n))) - 1
    return f"about {round(n, -digits):,.0f}"


def verdict(points: list[dict], estimate: dict) -> str:
    """One plain sentence for the user: more labels or not, how many for the target, deep against classical."""
    largest, deep = estimate["largest_n"], estimate["deep"]
    gain = 100 * deep["gain_if_doubled"]
    if deep["more_labels_help"]:
        parts = [f"More labels would likely help: doubling them to {2 * largest:,} is projected to raise the deep "
                 f"model's accuracy by about {gain:.1f} points"]  # fmt: skip
    else:
        levels = f", levelling off near {deep['asymptote']:.1%}" if deep["asymptote"] < 1 else ""
        parts = [f"More labels would likely not help much: doubling them to {2 * largest:,} is projected to add "
                 f"only {max(gain, 0):.1f} points to the deep model's accuracy{levels}"]  # fmt: skip
    target = estimate["target"]
    if target is not None:
        status, needed = deep["target_status"], deep["n_for_target"]
        if status == "reached":
            parts.append(f"{target:.1%} accuracy is already reached with {needed:,} labels")
        elif status == "reachable":
            rough = " (a rough extrapolation)" if needed > EXTRAPOLATION_NOTE * largest else ""
            parts.append(f"{about(needed)} labels should reach {target:.1%} accuracy{rough}")
        else:
            why = (
                f"it levels off near {deep['asymptote']:.1%}"
                if status == "not reachable"
                else f"it would take more than {MAX_LABELS:,.0f} labels"
            )
            parts.append(f"{target:.1%} accuracy is not reachable under this fit ({why})")
    last = points[-1]
    if estimate["leader_at_largest"] == "classical":
        scores = f"{last['classical']:.1%} vs {last['deep']:.1%}"
        behind = f"the classical baseline is ahead at {largest:,} labels ({scores})"
        crossing = estimate["deep_overtakes_classical_at"]
        parts.append(
            f"{behind} and the deep model is projected to overtake it at {about(crossing)} labels"
            if crossing is not None
            else f"{behind} and is projected to stay ahead"
        )
    elif estimate["leader_at_largest"] == "deep":
        scores = f"{last['deep']:.1%} vs {last['classical']:.1%}"
        parts.append(f"the deep model is ahead of the classical baseline ({scores})")
    else:
        parts.append(f"the deep model and the classical baseline tie at {last['deep']:.1%}")
    return "; ".join(parts) + "."


# ---------------------------------------------------------------------- output


def write_curve(out_dir: Path, curve: dict) -> None:
    """curve.png, report.html, then curve.json (its presence marks a finished curve); the partial file goes last."""
    from layerwise.report.curve_sections import curve_page, curve_png

    png = curve_png(curve)
    write_atomic(out_dir / PNG_FILE, png)
    write_atomic(out_dir / REPORT_FILE, curve_page(curve, png))
    write_json(out_dir / CURVE_FILE, curve)
    (out_dir / PARTIAL_FILE).unlink(missing_ok=True)


def print_curve(curve: dict, out: Console, out_dir: Path | None = None) -> None:
    """The points as a table, the fits, the verdict and where the files are."""
    table = Table(title=f"learning curve: validation accuracy on {curve['data']['n_val']:,} held-out examples")
    for column in ("labels", "n", "deep", "classical", "deep time", "classical time", "epochs"):
        table.add_column(column, justify="left" if column == "labels" else "right")
    for name, point in zip(FRACTION_NAMES, curve["points"], strict=True):
        table.add_row(
            name, f"{point['n']:,}", f"{point['deep']:.1%}", f"{point['classical']:.1%}",
            f"{point['deep_seconds']:.1f} s", f"{point['classical_seconds']:.1f} s", str(point["epochs"]),
        )  # fmt: skip
    out.print(table)
    for name in ("deep", "classical"):
        fit = curve["fit"][name]
        out.print(f"fit ({name}): {fit['formula']} ({fit['method']})", highlight=False, soft_wrap=True)
    out.print(curve["verdict"], highlight=False, soft_wrap=True)
    for note in curve.get("notes", []):
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    out.print(f"took {curve['seconds']:.0f} s", highlight=False)
    if out_dir is not None:
        written = ", ".join(str(out_dir / name) for name in (CURVE_FILE, PNG_FILE, REPORT_FILE))
        out.print(f"wrote {written}", highlight=False, soft_wrap=True)
