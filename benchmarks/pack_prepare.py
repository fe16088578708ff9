"""What packing saves each run: preparing a run from the raw files against from their pack.

From raw files every run reads and decodes them again: for text generation, the documents are read, the BPE
tokenizer trained and the corpus tokenised; for detection, every image is decoded and letterboxed; for
transcription, every clip is decoded and resampled. From a pack (`layerwise pack DATA --out SHARDS`, paid once)
a run maps two token files, or reads the validation images and the boxes (the training images are streamed
during training), or maps one waveform file. Times the task's `prepare` both ways on the same
data, alternating, and prints the ratio; the pack's own cost is printed beside them.

    .venv/bin/python benchmarks/pack_prepare.py [--task generate|detect|transcribe] [--data PATH] [--rounds 3]

Default data: Jane Austen's six novels (Debian's r-cran-janeaustenr) for generate; 2,000 composed scenes of
Fashion-MNIST objects (`layerwise.data.scenes`) for detect; the speech demo's training manifest (`make
demo-transcribe`'s data, synthesised on first use) for transcribe.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from layerwise.data.austen import prepare_austen
from layerwise.data.scenes import compose_scenes
from layerwise.data.speech_demo import prepare_speech_demo
from layerwise.demo import default_cache
from layerwise.pack import pack
from layerwise.tasks import task_class
from layerwise.tasks.base import FitOptions


def prepare_seconds(task: str, data: Path) -> tuple[float, int]:
    started = time.perf_counter()
    prepared = task_class(task).prepare(data, FitOptions(), log=lambda _: None)
    return time.perf_counter() - started, prepared.data_summary["n_train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("generate", "detect", "transcribe"), default="generate")
    parser.add_argument("--data", type=Path, default=None, help="the raw data (default: see the module docstring)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None and args.task == "generate":
            data = prepare_austen(default_cache())
        elif data is None and args.task == "detect":
            data = compose_scenes(Path(tmp) / "scenes", 2000, seed=0, split="train")
        elif data is None:
            data = prepare_speech_demo(default_cache() / "speech").train_manifest
        started = time.perf_counter()
        pack(data, Path(tmp) / "packed", task=args.task, log=lambda _: None)
        pack_seconds = time.perf_counter() - started
        raw, packed = [], []
        for _ in range(args.rounds):
            seconds, n_raw = prepare_seconds(args.task, data)
            raw.append(seconds)
            seconds, n_packed = prepare_seconds(args.task, Path(tmp) / "packed")
            packed.append(seconds)
        assert n_raw == n_packed, "the pack must hold what the raw data gives"
    units = {"generate": "training tokens", "detect": "training images", "transcribe": "training clips"}[args.task]
    print(f"{data}: {n_raw:,} {units}; pack once: {pack_seconds:.1f} s")
    print(f"prepare from raw data: {statistics.median(raw):.2f} s, from the pack: {statistics.median(packed):.3f} s")
    print(f"ratio={statistics.median(raw) / statistics.median(packed):.1f} (raw / packed preparation time)")


if __name__ == "__main__":
    main()
