"""What does the generate task cost, and does the network beat the n-gram model?

(a) Training throughput: tokens/s of layerwise's `train()` (the generate task's loss, fed by
    `RandomWindows` over Austen's tokens) against a bare hand-written PyTorch loop on the same gpt_tiny
    initialisation and the same batches, alternating rounds. Target ratio >= 0.95.
(b) Generation: tokens/s with the KV cache against recomputing the window, 256 new tokens.
(c) Quality: bits per byte on held-out Austen text after `--budget` seconds of training (default 300,
    i.e. 5 minutes on 2 CPU cores), beside the interpolated Kneser-Ney byte 6-gram on the same split.

    .venv/bin/python benchmarks/generate.py [--steps 40] [--rounds 3] [--budget 300] [--skip-quality]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from loop_pair import compare_loops

from layerwise.data.austen import prepare_austen
from layerwise.demo import default_cache
from layerwise.models import create_model
from layerwise.models.gpt import generate
from layerwise.tasks.base import FitOptions
from layerwise.tasks.generate import GenerateTask
from layerwise.training.loop import TrainConfig


def throughput(prepared, steps: int, rounds: int) -> None:
    config = TrainConfig(epochs=1, batch_size=prepared.batch_size, lr=3e-3, patience=10**6)
    batches = list(itertools.islice(prepared.train_batches.epoch(0), steps))  # the same batches for both loops
    torch.manual_seed(0)
    initial = create_model(prepared.model_name, **prepared.model_config)
    tokens = steps * prepared.batch_size * prepared.model_config["context_len"]
    ratio = compare_loops(
        initial, batches, lambda m, x, y: prepared.task.loss(m, x, y)[0], config, tokens, "tokens", rounds
    )
    print(f"(a) training throughput ratio layerwise/bare = {ratio:.3f} (target >= 0.95)")


def generation_speed(prepared, new_tokens: int = 256) -> None:
    torch.manual_seed(0)
    model = create_model(prepared.model_name, **prepared.model_config).eval()
    prompt = prepared.task.encode("It is a truth universally acknowledged")
    rates = {}
    for use_cache in (True, False):
        generate(model, prompt, 8, temperature=0, use_cache=use_cache)  # warm-up
        started = time.perf_counter()
        generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
        rates[use_cache] = new_tokens / (time.perf_counter() - started)
    print(f"(b) generation: KV cache {rates[True]:,.0f} tokens/s, no cache {rates[False]:,.0f} tokens/s, "
          f"ratio {rates[True] / rates[False]:.2f}x")  # fmt: skip


def quality(corpus: Path, budget: float) -> None:
    from layerwise.api import fit

    with tempfile.TemporaryDirectory() as tmp:
        model = fit(corpus, Path(tmp) / "run", task="generate", epochs=1000, time_budget=budget, show_progress=False)
    deep, ngram = model.summary["metrics"]["bits_per_byte"], model.summary["baseline"]["bits_per_byte"]
    print(f"(c) held-out Austen after {budget:g} s: network {deep:.3f} bits/byte, "
          f"{model.summary['baseline']['model']} {ngram:.3f} bits/byte; ratio network/n-gram {deep / ngram:.3f} "
          f"(below 1 means the network wins)")  # fmt: skip
    print(model.summary["verdict"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    corpus = prepare_austen(default_cache())
    started = time.perf_counter()
    prepared = GenerateTask.prepare(corpus, FitOptions(), log=lambda *_: None)
    seconds = time.perf_counter() - started
    n_tokens = prepared.data_summary["n_train"]
    print(f"Austen: {n_tokens:,} training tokens, prepared in {seconds:.1f} s; model {prepared.model_name}")
    throughput(prepared, args.steps, args.rounds)
    generation_speed(prepared)
    if not args.skip_quality:
        quality(corpus, args.budget)


if __name__ == "__main__":
    main()
