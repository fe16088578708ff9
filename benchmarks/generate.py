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
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from layerwise.data.austen import prepare_austen
from layerwise.demo import default_cache
from layerwise.models import create_model
from layerwise.models.gpt import generate
from layerwise.runtime import autocast_for
from layerwise.tasks.base import FitOptions
from layerwise.tasks.generate import GenerateTask
from layerwise.training.loop import TrainConfig, make_optimizer, prepare_model, train


def throughput(prepared, steps: int, rounds: int) -> None:
    config = TrainConfig(epochs=1, batch_size=prepared.batch_size, lr=3e-3, patience=10**6)
    windows = prepared.train_batches

    class Fixed:  # the first `steps` batches of epoch 0, for both variants
        def __len__(self) -> int:
            return steps

        def epoch(self, epoch: int, start: int = 0):
            for i, batch in enumerate(windows.epoch(epoch, start)):
                if i + start >= steps:
                    return
                yield batch

    class NoValidation:  # one nominal batch (the loop requires one); Objective.evaluate never reads it
        def __len__(self) -> int:
            return 1

        def epoch(self, epoch: int = 0, start: int = 0):
            return iter(())

    class Objective:  # the task's loss; validation left out of both variants
        monitor, higher_is_better = "loss", False

        def loss(self, model, x, y):
            return prepared.task.loss(model, x, y)

        def evaluate(self, model, batches):
            return {"loss": 0.0}

    torch.manual_seed(0)
    initial = create_model(prepared.model_name, **prepared.model_config)
    tokens_per_step = prepared.batch_size * prepared.model_config["context_len"]

    def layerwise_run() -> float:
        model = copy.deepcopy(initial)
        started = time.perf_counter()
        train(model, Fixed(), NoValidation(), config, show_progress=False, log=lambda *_: None, objective=Objective())
        return steps * tokens_per_step / (time.perf_counter() - started)

    def bare_run() -> float:
        model = prepare_model(copy.deepcopy(initial), torch.device("cpu"))
        optimizer = make_optimizer(model, config)
        started = time.perf_counter()
        model.train()
        for x, y in Fixed().epoch(0):
            with autocast_for(torch.device("cpu"), True):
                logits = model(x).float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * tokens_per_step / (time.perf_counter() - started)

    layerwise_run(), bare_run()  # warm-up
    ours, bare = [], []
    for i in range(rounds):
        ours.append(layerwise_run())
        bare.append(bare_run())
        print(f"round {i + 1}: layerwise {ours[-1]:,.0f} tokens/s, bare {bare[-1]:,.0f} tokens/s")
    ratio = statistics.median(ours) / statistics.median(bare)
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
