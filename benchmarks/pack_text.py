"""What packing a text corpus saves: preparing a generate run from raw text against from its pack.

From raw text every run reads the documents, trains the BPE tokenizer and tokenises the corpus; from a pack
(`layerwise pack CORPUS --out SHARDS`, paid once) it maps two token files. Times `GenerateTask.prepare` both
ways on the same corpus (Jane Austen's six novels, Debian's r-cran-janeaustenr, by default), alternating,
and prints the ratio; the pack's own cost is printed beside them.

    .venv/bin/python benchmarks/pack_text.py [--corpus DIR_OR_FILE] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from layerwise.data.austen import prepare_austen
from layerwise.demo import default_cache
from layerwise.pack import pack
from layerwise.tasks.base import FitOptions
from layerwise.tasks.generate import GenerateTask


def prepare_seconds(data: Path) -> tuple[float, int]:
    started = time.perf_counter()
    prepared = GenerateTask.prepare(data, FitOptions(), log=lambda _: None)
    return time.perf_counter() - started, prepared.data_summary["n_train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="text to use (default: the Austen novels)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    corpus = args.corpus or prepare_austen(default_cache())
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        pack(corpus, Path(tmp) / "packed", task="generate", log=lambda _: None)
        pack_seconds = time.perf_counter() - started
        raw, packed = [], []
        for _ in range(args.rounds):
            seconds, n_raw = prepare_seconds(corpus)
            raw.append(seconds)
            seconds, n_packed = prepare_seconds(Path(tmp) / "packed")
            packed.append(seconds)
        assert n_raw == n_packed, "the pack must hold the tokens raw text gives"
    print(f"{corpus}: {n_raw:,} training tokens; pack once: {pack_seconds:.1f} s")
    print(f"prepare from raw text: {statistics.median(raw):.2f} s, from the pack: {statistics.median(packed):.3f} s")
    print(f"ratio={statistics.median(raw) / statistics.median(packed):.1f} (raw / packed preparation time)")


if __name__ == "__main__":
    main()
