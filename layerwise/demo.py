"""`layerwise demo`: the embedded default run on real data that ships offline.

Fashion-MNIST (Debian's dataset-fashion-mnist) is written out as folders of PNG files first, so the
demo goes through exactly the raw-file path a user's data takes.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console

from layerwise.data.datasets import DatasetUnavailable, prepare_fashion_mnist
from layerwise.errors import InputError
from layerwise.files import write_json

DEMO_EPOCHS = 20  # on 2 CPU cores the time budget decides first (~19 epochs in 480 s)
console = Console()


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerwise"


def run_demo(
    out: Path | None = None, data_dir: Path | None = None, time_budget: float = 480.0, download: bool = False
) -> dict:
    """Prepare the data, train, evaluate on the official test set; returns the test metrics."""
    from layerwise.api import fit

    started = time.perf_counter()
    data_dir = data_dir or default_cache() / "fashion-mnist"
    out = out or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        train_dir = prepare_fashion_mnist(data_dir, "train", download=download)
        test_dir = prepare_fashion_mnist(data_dir, "test", download=download)
    except DatasetUnavailable as err:
        raise InputError(str(err)) from err
    console.print(f"data: {train_dir} and {test_dir} ({time.perf_counter() - started:.0f} s to prepare)")

    model = fit(train_dir, out, epochs=DEMO_EPOCHS, time_budget=time_budget, val_fraction=0.05)
    metrics, problems = model.evaluate(test_dir)
    wall = time.perf_counter() - started
    summary = model.summary | {"test": metrics, "wall_seconds": round(wall, 1)}
    write_json(out / "metrics.json", summary)

    console.print(f"\n[bold]Fashion-MNIST test accuracy: {metrics['accuracy']:.2%}[/] on {metrics['n']:,} test images")
    console.print(
        f"classical baseline ({summary['baseline']['model']}): "
        f"{summary['baseline']['accuracy']:.2%} on the validation split"
    )
    console.print(summary["verdict"])
    console.print(f"wall time: {wall / 60:.1f} min ({wall:.0f} s) for data, training, baseline, evaluation and report")
    console.print(f"report: {out / 'report.html'}")
    if problems:
        console.print(f"[yellow]{len(problems)} test inputs skipped[/]")
    return summary
