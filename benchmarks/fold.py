"""How well does the fold network do after a fixed CPU budget, against the helix and template baselines?

Trains (once, cached under .cache/bench/fold-run) the default fold model on the demo's 3,000 ProMod3
chains for --budget seconds (default 900 s; the demo trains 300 s, and pLDDT ranks residues better after
longer training, see README), then scores it and both baselines on (a) the held-out validation chains
(single-linkage clusters at > 30% identity kept apart) and (b) theseus-examples' protein families, which no
training chain is within 30% identity of. Prints mean lDDT-Cα, RMSD, GDT-TS and TM-score per model as a
table, the pLDDT-vs-lDDT Pearson correlation, and the time `fold` takes per 100 residues (batch of one,
sequences of 100-400 residues).

    .venv/bin/python benchmarks/fold.py [--budget 900] [--retrain]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import layerwise
from layerwise.api import fit
from layerwise.data.protein_demo import prepare_fold_demo
from layerwise.demo import default_cache

BENCH_RUN = Path(".cache/bench/fold-run")


def table(title: str, metrics: dict, baseline: dict) -> None:
    print(f"\n{title}")
    print(f"  {'model':<28}{'lDDT-Cα':>9}{'RMSD Å':>9}{'GDT-TS':>9}{'TM-score':>10}")
    rows = [
        ("network", metrics),
        ("nearest-sequence template", baseline["template"]),
        ("ideal α-helix", baseline["helix"]),
    ]
    for name, m in rows:
        print(f"  {name:<28}{m['lddt_ca']:>9.3f}{m['rmsd']:>9.1f}{m['gdt_ts']:>9.3f}{m['tm_score']:>10.3f}")
    best = max(baseline["template"]["lddt_ca"], baseline["helix"]["lddt_ca"])
    print(f"  network - best baseline: {metrics['lddt_ca'] - best:+.3f} lDDT-Cα; pLDDT vs true lDDT Pearson "
          f"{metrics['plddt_pearson']:.2f} per residue, {metrics['plddt_pearson_chains']:.2f} per chain")  # fmt: skip
    if "plddt_fit" in metrics:
        fit = metrics["plddt_fit"]
        print(f"  pLDDT head fitted after training on {fit['residues']:,} residues of {fit['chains']} whole training "
              f"chains: cross-entropy {fit['loss_before']:.3f} -> {fit['loss_after']:.3f}")  # fmt: skip
    if "lddt_ca_sd_residues" in metrics:  # not in a cached run from before these keys
        print(f"  spread of the network's true lDDT-Cα: sd {metrics['lddt_ca_sd_residues']:.3f} across residues, "
              f"{metrics['lddt_ca_sd_chains']:.3f} across chains")  # fmt: skip


def cached_run_matches(budget: float) -> bool:
    """Whether .cache/bench/fold-run is a finished run of this budget and of this layerwise's fold recipe."""
    if not (BENCH_RUN / "metrics.json").is_file():
        return False
    config = json.loads((BENCH_RUN / "config.json").read_text())
    return config["train"]["time_budget_s"] == budget and config["model"]["config"].get("geometry_confidence", False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=900.0, help="training seconds")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    train, test = prepare_fold_demo(default_cache())
    if args.retrain or not cached_run_matches(args.budget):
        shutil.rmtree(BENCH_RUN, ignore_errors=True)
        fit(train, BENCH_RUN, task="fold", epochs=1000, time_budget=args.budget, show_progress=False)
    model = layerwise.load(BENCH_RUN)
    summary = json.loads((BENCH_RUN / "metrics.json").read_text())
    print(f"{summary['model']} ({summary['parameters']:,} parameters), {summary['train_seconds']} s of training "
          f"({summary['steps']} steps) on {summary['machine']}, torch {torch.__version__}")  # fmt: skip
    table(f"(a) held-out validation chains ({summary['metrics']['n_chains']})", summary["metrics"], summary["baseline"])
    test_metrics, _ = model.evaluate(test)
    table(f"(b) theseus families never seen in training ({test_metrics['n_chains']} chains)", test_metrics,
          test_metrics["baseline"])  # fmt: skip
    sequences = [
        "".join("ACDEFGHIKLMNPQRSTVWY"[(i * 7 + j) % 20] for j in range(n)) for i, n in enumerate((100, 200, 400))
    ]
    for sequence in sequences:
        model.predict([sequence])  # warm-up
        started = time.perf_counter()
        model.predict([sequence])
        seconds = time.perf_counter() - started
        print(
            f"fold {len(sequence)} residues: {seconds:.2f} s ({100 * seconds / len(sequence):.2f} s per 100 residues)"
        )


if __name__ == "__main__":
    main()
