"""Fold: amino-acid sequence in, Cα coordinates with a per-residue confidence (pLDDT) out.

Targets are protein chains read from PDB/mmCIF files (data/structures.py, gemmi); the split holds out
chains by sequence identity (data/similarity.py), so validation measures folding proteins unlike the
training ones; the network is models/folder.py; the monitor is lDDT-Cα; the honest baselines are an
ideal α-helix and a nearest-sequence template (tasks/fold_baselines.py). The template library (the
training chains) is stored in the run, so `evaluate` scores the baselines on any held-out data too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from torch import nn

from layerwise.data.crops import ChainBatches, sequence_batch
from layerwise.data.shards import is_shard_folder, read_pack
from layerwise.data.sources import Problem
from layerwise.data.structures import STRUCTURE_EXTENSIONS, ProteinChain
from layerwise.errors import InputError
from layerwise.models.registry import model_entry
from layerwise.runtime import model_device
from layerwise.tasks.base import FitOptions, PackOptions, Prepared, RunMismatch, fingerprint, result_rows

if TYPE_CHECKING:
    from layerwise.serve.export import Graph

DEFAULT_MODEL = "fold_xs"
TRAIN_CROP = 128  # residues per training window (AlphaFold crops too: memory grows with L^2, time with L^3)
EVAL_CROP = 128  # the per-epoch validation scores each chain's first 128 residues, the same window every epoch
EVAL_CHAINS = 96  # validation chains scored every epoch (all of them, whole, at the end): an epoch's check
# of 300 chains at 256 residues took as long as 250 training steps on 2 cores
MAX_LENGTH = 1000  # the longest sequence `fold` accepts: the pair representation is L x L
BATCH = 8
EVAL_BATCH = 8
DEFAULT_LR = 1e-3
MAX_IDENTITY = 0.3  # no validation chain shares more than 30% identity with a training chain
TEMPLATES_FILE = "templates.safetensors"
METRIC_KEYS = ("lddt_ca", "rmsd", "gdt_ts", "tm_score")
REPORT_CHAINS = 6


@dataclass(frozen=True)
class FoldResult:
    name: str
    sequence: str
    coords: np.ndarray  # (L, 3) Å
    plddt: np.ndarray  # (L,) 0-100
    pdb: str = ""  # the file written by `fold --out`, if any

    @property
    def plddt_mean(self) -> float:
        return float(self.plddt.mean())

    @property
    def path(self) -> str:  # what batch prediction and serve echo back
        return self.name

    def to_json(self) -> dict:
        return {"name": self.name, "sequence": self.sequence, "plddt_mean": round(self.plddt_mean, 2), "pdb": self.pdb}

    def to_line(self) -> str:
        where = f"\t{self.pdb}" if self.pdb else ""
        return f"{self.name}\t{len(self.sequence)} residues\tpLDDT {self.plddt_mean:.1f}{where}"


class FoldTask:
    """A fitted fold task: crop sizes, the split rule, and the training chains as templates for the baseline."""

    name = "fold"
    modality = "protein"
    monitor = "lddt_ca"
    higher_is_better = True
    commands = frozenset({"fold", "predict", "evaluate"})

    def __init__(self, crop: int = TRAIN_CROP, templates: list[ProteinChain] | None = None) -> None:
        self.crop = crop
        self.templates = templates or []

    @classmethod
    def claims(cls, data: Path) -> bool:
        return looks_like_structures(Path(data))

    def to_json(self) -> dict:
        return {"modality": "protein", "preprocessing": {"modality": "protein", "crop": self.crop}}

    @classmethod
    def from_config(cls, config: dict) -> FoldTask:
        return cls(int(config["preprocessing"]["crop"]))

    def run_files(self) -> dict[str, bytes]:
        return {TEMPLATES_FILE: templates_to_bytes(self.templates)} if self.templates else {}

    def load_run_files(self, run_dir: Path) -> None:
        if (run_dir / TEMPLATES_FILE).is_file():
            self.templates = templates_from_bytes((run_dir / TEMPLATES_FILE).read_bytes())

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, inputs: tuple, targets: tuple) -> tuple[torch.Tensor, dict]:
        from layerwise.models.folder import fold_loss

        tokens, residue_mask = inputs
        coords, coord_mask = targets
        return fold_loss(model(tokens, residue_mask), coords, coord_mask, residue_mask)

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Validation loss, lDDT-Cα and RMSD (the cheap metrics; GDT-TS and TM-score come at the end)."""
        from layerwise.models.folder import fold_loss
        from layerwise.tasks.structure_metrics import lddt_ca, rmsd

        was_training = model.training
        model.eval()
        losses, lddts, rmsds = [], [], []
        device = model_device(model)
        with torch.no_grad():
            for (tokens, residue_mask), (coords, coord_mask) in batches.epoch(0):
                tokens, residue_mask = tokens.to(device), residue_mask.to(device)
                coords, coord_mask = coords.to(device), coord_mask.to(device)
                outputs = model(tokens, residue_mask)
                losses.append(float(fold_loss(outputs, coords, coord_mask, residue_mask)[0]))
                known = coord_mask & residue_mask
                lddts += lddt_ca(outputs["coords"].float(), coords, known).tolist()
                rmsds += rmsd(outputs["coords"].float(), coords, known).tolist()
        model.train(was_training)
        return {"loss": float(np.mean(losses)), "lddt_ca": float(np.mean(lddts)), "rmsd": float(np.mean(rmsds))}

    @classmethod
    def prepare(cls, data: Path, options: FitOptions, saved: dict | None = None, donor=None, log=print) -> Prepared:
        """Read the structures and split them by sequence identity; or, for a folder `layerwise pack --task
        fold` wrote, read the chains and the split made there."""
        started = time.perf_counter()
        packed = {}
        if is_shard_folder(data):
            index = read_pack(data, "fold", options.val_fraction, log)
            train, val, problems, counts, split = packed_chains(data, index, log)
            packed = {"packed_from": index["source"], "val_fraction": index["val_fraction"]}
        else:
            train, val, problems, counts, split = read_and_split(data, options.val_fraction, options.seed, log)
        root = Path(data)
        data_summary = {
            "source": str(root), "format": "structures", "n_train": len(train), "n_val": len(val),
            "n_skipped": len(problems), "val_fraction": options.val_fraction, "counts": counts, "split": split,
            "fingerprint": fingerprint([f"train {c.name} {c.sequence}" for c in train]
                                       + [f"val {c.name} {c.sequence}" for c in val]),
        } | packed  # fmt: skip
        if saved is not None and saved["data"].get("fingerprint") not in (None, data_summary["fingerprint"]):
            raise RunMismatch(f"--resume: the structures under {root} differ from the ones the run started on")
        model_name = options.model or DEFAULT_MODEL
        if "fold" not in model_entry(model_name).tasks:
            raise InputError(f"--model {model_name} does not fold proteins (folding models: fold_xs, fold_s)")
        crop = int(saved["preprocessing"]["crop"]) if saved else TRAIN_CROP
        batch = options.batch_size or BATCH

        def train_batches(size: int) -> ChainBatches:
            return ChainBatches(train, size, crop, shuffle=True, seed=options.seed)

        return Prepared(
            task=cls(crop, templates=train),
            train_batches=train_batches(batch),
            batches_of=train_batches,
            val_batches=ChainBatches(sorted(val[:EVAL_CHAINS], key=lambda c: len(c.sequence)), EVAL_BATCH, EVAL_CROP),
            model_name=model_name,
            # A resumed run keeps the network it was saved with (runs from before the geometry inputs lack them).
            model_config=saved["model"]["config"] if saved else {"geometry_confidence": True},
            data_summary=data_summary,
            problems=problems,
            batch_size=batch,
            lr=DEFAULT_LR,
            extras={
                "train": train,
                "val": val,
                "decode_seconds": time.perf_counter() - started,
                "split": f"validation: {split['rule']}; {len(val)} chains (also used for early stopping)",
            },  # fmt: skip
        )

    @classmethod
    def pack_into(cls, data: Path, staging: Path, options: PackOptions, log=print) -> dict:
        """`layerwise pack` for folding (see `pack_structures`); one chain file per split, whatever shard_size."""
        if options.modality not in (None, "protein"):
            raise InputError(f"--modality {options.modality}: folding learns from protein structures")
        return pack_structures(data, staging, options.val_fraction, options.seed, log)

    # ------------------------------------------------------------------ after training

    def final_metrics(self, network: nn.Module, prepared: Prepared) -> dict:
        from layerwise.tasks.fold_confidence import fit_confidence

        plddt_fit = fit_confidence(network, prepared.extras["train"])  # the head only; before the chains are scored
        val = prepared.extras["val"]
        results = self.fold_chains(network, val)
        scored = score_chains(val, [r.coords for r in results], [r.plddt for r in results])
        prepared.extras["val_scores"] = scored
        prepared.extras["val_results"] = results
        return summarise(scored) | {"plddt_fit": plddt_fit}

    def baseline(self, prepared: Prepared, seed: int) -> dict:
        return baseline_scores(self.templates, prepared.extras["val"])

    def verdict(self, metrics: dict, baseline: dict, approach: str = "from scratch") -> str:
        from layerwise.baseline import verdict

        best = max(("template", "helix"), key=lambda name: baseline[name]["lddt_ca"])
        return (
            verdict(
                metrics["lddt_ca"],
                baseline[best]["lddt_ca"],
                metric="lDDT-Cα ",
                show=lambda v: f"{v:.3f}",
                approach=approach,
            )
            + f" (the best baseline here is the {BASELINE_NAMES[best]})"
        )

    def summary_rows(self, summary: dict) -> list[tuple[str, str]]:
        show = lambda v: f"lDDT-Cα {v:.3f}"  # noqa: E731
        rows = result_rows({**summary, "baseline": {}}, "lddt_ca", show)
        for name in ("template", "helix"):
            if summary["baseline"].get(name):
                rows.append((f"baseline: {BASELINE_NAMES[name]}", show(summary["baseline"][name]["lddt_ca"])))
        return rows

    def write_report(self, run_dir: Path, bundle, summary: dict, result, prepared: Prepared, log=print) -> None:
        from layerwise.report.fold_sections import fold_sections
        from layerwise.tasks.classify import write_task_report

        extras, baseline = prepared.extras, summary["baseline"]
        best = max(("template", "helix"), key=lambda name: baseline[name]["lddt_ca"])
        sections = fold_sections(
            report_chains(extras["val"], extras["val_results"], extras["val_scores"]),
            baselines={BASELINE_NAMES[k]: baseline[k] for k in ("template", "helix")},
        )
        best_baseline = {"model": BASELINE_NAMES[best], **baseline[best]}
        write_task_report(run_dir, bundle, summary, result, prepared, self, best_baseline, sections)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def fold_sequences(self, network: nn.Module, records: list[tuple[str, str]]) -> list[FoldResult]:
        """Coordinates and pLDDT for (name, sequence) records, a few at a time (similar lengths together)."""
        from layerwise.models.folder import plddt

        network.eval()
        device = model_device(network)
        order = sorted(range(len(records)), key=lambda i: len(records[i][1]))
        results: dict[int, FoldResult] = {}
        for start in range(0, len(order), EVAL_BATCH):
            part = order[start : start + EVAL_BATCH]
            tokens, residue_mask = sequence_batch([records[i][1] for i in part])
            outputs = network(tokens.to(device), residue_mask.to(device))
            coords, confidence = outputs["coords"].float().cpu().numpy(), plddt(outputs["plddt_logits"]).cpu().numpy()
            for row, i in enumerate(part):
                name, sequence = records[i]
                n = len(sequence)
                results[i] = FoldResult(name, sequence, coords[row, :n], confidence[row, :n])
        return [results[i] for i in range(len(records))]

    def fold_chains(self, network: nn.Module, chains: list[ProteinChain]) -> list[FoldResult]:
        """Fold each chain's sequence (its first MAX_LENGTH residues)."""
        return self.fold_sequences(network, [(c.name, c.sequence[:MAX_LENGTH]) for c in chains])

    def fold(
        self, network: nn.Module, inputs: list[str], out_dir: Path | None = None
    ) -> tuple[list[FoldResult], list[Problem]]:
        """`layerwise fold`: raw sequences or FASTA files in; with `out_dir`, a PDB file (pLDDT as B-factor)
        and a distance-map PNG per chain. Sequences longer than MAX_LENGTH are refused by name."""
        records, problems = read_sequences(inputs)
        results = self.fold_sequences(network, records) if records else []
        if out_dir is not None and results:
            results = write_folds(results, Path(out_dir))
        return results, problems

    def predict(self, network: nn.Module, inputs: list, texts=None, k: int = 3, **options):
        return self.fold(network, [*map(str, inputs), *(texts or [])], options.get("out_dir"))

    def predict_stream(self, network: nn.Module, examples: list, k: int = 3):
        results, problems = self.fold(network, [e.text if e.text is not None else str(e.path) for e in examples])
        yield from problems
        yield from results

    def find_inputs(self, inputs: list, texts: list[str] | None = None):
        from layerwise.data.sources import Example

        return [Example(origin=str(item), label=None, text=str(item)) for item in [*inputs, *(texts or [])]], []

    def evaluate_data(self, network: nn.Module, data: str | Path) -> tuple[dict, list[Problem]]:
        """Structural metrics of the network, and of both baselines, on the chains of held-out structure files."""
        from layerwise.data.structures import read_structures

        chains, problems, _ = read_structures(Path(data))
        if not chains:
            raise InputError(f"{data}: no usable protein chain to evaluate" + "".join(
                f"\n  {p.origin}: {p.reason}" for p in problems[:10]))  # fmt: skip
        results = self.fold_chains(network, chains)
        metrics = summarise(score_chains(chains, [r.coords for r in results], [r.plddt for r in results]))
        if self.templates:
            metrics["baseline"] = baseline_scores(self.templates, chains)
        return metrics, problems

    # ------------------------------------------------------------------ export

    def export_graphs(self, network: nn.Module, data: Path, n: int) -> list[Graph]:
        """One graph for `layerwise export`: FoldExport (tokens, residue_mask) -> (coords, plddt_logits,
        distogram_logits), batch and length dynamic. Its parity inputs are up to `n` real chains of `data`, each
        cut to its first EVAL_CROP residues (the per-epoch validation window: whole chains cost O(L^3) on CPU),
        padded to the longest; the variants are the first half of those residues, and the shortest chain alone."""
        from layerwise.models.folder import DISTOGRAM_BINS, PLDDT_BINS, FoldExport
        from layerwise.serve.export import MAX_BATCH, Graph

        sequences = [chain.sequence[:EVAL_CROP] for chain in export_chains(Path(data), n)]
        tokens, residue_mask = sequence_batch(sequences)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        length = torch.export.Dim("length", min=2, max=MAX_LENGTH)  # shared: one length for tokens and mask
        half = max(2, tokens.shape[1] // 2)
        shortest = sequence_batch([min(sequences, key=len)])
        meaning = (
            "coords (batch, length, 3): predicted Cα positions in Å, in an arbitrary frame; plddt_logits (batch, "
            f"length, {PLDDT_BINS}): per-residue confidence logits, pLDDT as in `decoding`; distogram_logits (batch, "
            f"length, length, {DISTOGRAM_BINS}): Cα-Cα distance-bin logits. Positions where residue_mask is False "
            "(padding) are meaningless."
        )
        return [
            Graph(
                FoldExport(network).eval(), (tokens, residue_mask), ("tokens", "residue_mask"), FoldExport.output_names,
                ({0: batch, 1: length}, {0: batch, 1: length}), meaning,
                variants=((tokens[:, :half], residue_mask[:, :half]), shortest),
            )
        ]  # fmt: skip

    def export_decoding(self) -> str:
        """How to fold a sequence with the exported graph and numpy, as `layerwise fold` does."""
        from layerwise.data.crops import PAD
        from layerwise.data.structures import AMINO_ACIDS, RARE_LETTERS, UNKNOWN_INDEX
        from layerwise.models.folder import DISTOGRAM_BINS, DISTOGRAM_MAX, DISTOGRAM_MIN, PLDDT_BINS

        rare = ", ".join(f"{k}->{v}" for k, v in RARE_LETTERS.items())
        return (
            "Tokens: upper-case the sequence and drop a final '*'; replace rare letters "
            f"({rare}); each letter's id is its index in '{AMINO_ACIDS}' (A=0 .. Y=19), X or any other letter is "
            f"{UNKNOWN_INDEX}, padding is {PAD}. tokens int64 (batch, length); residue_mask bool (batch, length), True "
            "at real residues, False at padding. Several chains may share a batch, padded at the end to the longest: "
            f"a real residue's outputs do not depend on the padding. Length: up to {MAX_LENGTH} residues, the whole "
            "chain at once (layerwise refuses longer chains; there is no cropping or windowing at inference: "
            "preprocessing.crop is the training crop only). "
            "Outputs of a chain of n residues in row b: coords[b, :n] are its Cα coordinates in Å; its pLDDT (0-100) "
            f"is 100 * sum(softmax(plddt_logits[b, :n], axis=-1) * (arange({PLDDT_BINS}) + 0.5) / {PLDDT_BINS}, "
            "axis=-1), the centres of equal lDDT bins over [0, 1], and its mean is the chain's pLDDT; "
            f"softmax(distogram_logits[b, :n, :n], axis=-1) gives Cα-Cα distance probabilities over {DISTOGRAM_BINS} "
            f"bins with edges = linspace({DISTOGRAM_MIN:g}, {DISTOGRAM_MAX:g}, {DISTOGRAM_BINS - 1}) Å: bin 0 is "
            f"d <= edges[0], bin k is edges[k-1] < d <= edges[k], bin {DISTOGRAM_BINS - 1} is d > edges[-1]."
        )


BASELINE_NAMES = {"template": "nearest-sequence template", "helix": "ideal α-helix"}


# ---------------------------------------------------------------------- helpers


def looks_like_structures(data: Path, sample: int = 200) -> bool:
    """A folder whose files are mostly structure files (PDB/mmCIF, optionally gzipped)."""
    if not data.is_dir():
        return data.is_file() and data.name.lower().endswith(STRUCTURE_EXTENSIONS)
    names = []
    for path in data.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            names.append(path.name.lower())
            if len(names) >= sample:
                break
    hits = sum(name.endswith(STRUCTURE_EXTENSIONS) for name in names)
    return hits > 0 and hits >= len(names) / 2


def export_chains(data: Path, n: int) -> list[ProteinChain]:
    """Up to `n` distinct chains from structure files spread over `data`, reading only as many files as needed."""
    from layerwise.data.structures import read_structures, structure_files

    files = structure_files(data)
    chains: dict[str, ProteinChain] = {}
    # Every k-th file first, for chains from across the folder; then the rest, in case some hold no protein.
    for path in dict.fromkeys(files[:: max(1, len(files) // n)] + files):
        for chain in read_structures(path)[0]:
            chains.setdefault(chain.sequence, chain)
        if len(chains) >= n:
            break
    if not chains:
        raise InputError(f"{data}: no usable protein chain to check the export with")
    return list(chains.values())[:n]


def read_sequences(inputs: list[str]) -> tuple[list[tuple[str, str]], list[Problem]]:
    """(name, sequence) records from raw sequences and FASTA files; too-long sequences become problems."""
    from layerwise.data.structures import read_fasta

    records, problems = [], []
    for item in inputs:
        for name, sequence in read_fasta(item):
            if len(sequence) > MAX_LENGTH:
                problems.append(Problem(name, f"{len(sequence)} residues; this model folds at most {MAX_LENGTH}"))
            else:
                records.append((name, sequence))
    names = [name for name, _ in records]
    # Two records of one name would overwrite one another's PDB file: number the repeats.
    return [
        (f"{n}_{names[:i].count(n) + 1}" if names.count(n) > 1 else n, s) for i, (n, s) in enumerate(records)
    ], problems


def write_folds(results: list[FoldResult], out_dir: Path) -> list[FoldResult]:
    """NAME.pdb (Cα, pLDDT as B-factor) and NAME.png (predicted distance map) per result."""
    from dataclasses import replace

    from layerwise.data.structures import write_ca_pdb
    from layerwise.report.fold_sections import distance_map_png

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in result.name) or "chain"
        pdb = write_ca_pdb(out_dir / f"{stem}.pdb", result.sequence, result.coords, result.plddt)
        distances = np.linalg.norm(result.coords[:, None] - result.coords[None], axis=-1)
        (out_dir / f"{stem}.png").write_bytes(distance_map_png(distances, title=f"{result.name}: predicted"))
        written.append(replace(result, pdb=str(pdb)))
    return written


def score_chains(chains: list[ProteinChain], coords: list[np.ndarray], plddts: list[np.ndarray]) -> dict:
    """Per-chain lDDT-Cα, RMSD, GDT-TS, TM-score (on the residues whose Cα is known), per-residue lDDT and pLDDT."""
    scores: dict = {key: [] for key in METRIC_KEYS} | {"residue_lddt": [], "residue_plddt": []}
    threads = torch.get_num_threads()
    # One chain at a time is thousands of tiny tensor ops (GDT/TM superposition searches): threads only add
    # synchronisation, and on a busy machine 2 threads made them 25x slower than 1.
    torch.set_num_threads(1)
    try:
        for chain, predicted, confidence in zip(chains, coords, plddts, strict=True):
            score_chain(scores, chain, predicted, confidence)
    finally:
        torch.set_num_threads(threads)
    return scores


def score_chain(scores: dict, chain: ProteinChain, predicted: np.ndarray, confidence: np.ndarray) -> None:
    """Append one chain's metrics to `scores` (see score_chains)."""
    from layerwise.tasks.structure_metrics import gdt_ts, lddt_ca, lddt_scored, per_residue_lddt, rmsd, tm_score

    n = len(predicted)
    true = torch.from_numpy(chain.ca[:n]).float()[None]
    pred = torch.from_numpy(np.asarray(predicted, dtype=np.float32))[None]
    mask = torch.from_numpy(chain.mask[:n])[None]
    for key, metric in zip(METRIC_KEYS, (lddt_ca, rmsd, gdt_ts, tm_score), strict=True):
        scores[key].append(float(metric(pred, true, mask)[0]))
    residue = per_residue_lddt(pred, true, mask)[0].numpy()
    scores["residue_lddt"].append(np.where(lddt_scored(true, mask)[0].numpy(), residue, np.nan))
    scores["residue_plddt"].append(np.asarray(confidence, dtype=np.float32))


def summarise(scores: dict) -> dict:
    """Means of the per-chain metrics, and how well pLDDT tracks the true lDDT (Pearson, per residue and per chain)."""
    metrics = {key: float(np.mean(scores[key])) for key in METRIC_KEYS}
    residue_lddt = np.concatenate(scores["residue_lddt"])
    residue_plddt = np.concatenate(scores["residue_plddt"]) / 100
    known = ~np.isnan(residue_lddt)
    metrics["plddt_pearson"] = _pearson(residue_plddt[known], residue_lddt[known])
    chain_plddt = [float(p.mean()) / 100 for p in scores["residue_plddt"]]
    metrics["plddt_pearson_chains"] = _pearson(np.array(chain_plddt), np.array(scores["lddt_ca"]))
    metrics["plddt_mean"] = float(np.mean(chain_plddt) * 100)
    # How much the true lDDT varies, across residues and across chains: a correlation needs something to rank. A
    # network whose structures are equally rough everywhere leaves pLDDT only noise to track.
    metrics["lddt_ca_sd_residues"] = float(residue_lddt[known].std()) if known.any() else 0.0
    metrics["lddt_ca_sd_chains"] = float(np.std(scores["lddt_ca"]))
    metrics["n_chains"] = len(scores["lddt_ca"])
    return metrics


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def baseline_scores(templates: list[ProteinChain], chains: list[ProteinChain]) -> dict:
    """Both baselines' mean metrics on `chains`: the ideal helix and the nearest-sequence template."""
    from layerwise.tasks.fold_baselines import TemplateBaseline, ideal_helix

    started = time.perf_counter()
    sequences = [c.sequence[:MAX_LENGTH] for c in chains]
    template = TemplateBaseline(templates)
    results = {}
    for name, predict in (("template", template.predict), ("helix", lambda s: ideal_helix(len(s)))):
        coords = [np.asarray(predict(s), dtype=np.float32) for s in sequences]
        flat = [np.full(len(s), 50.0, dtype=np.float32) for s in sequences]  # baselines have no confidence
        scores = score_chains(chains, coords, flat)
        results[name] = {key: round(float(np.mean(scores[key])), 4) for key in METRIC_KEYS}
    best = max(results, key=lambda name: results[name]["lddt_ca"])
    return {"model": BASELINE_NAMES[best], **results[best], **results,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def report_chains(chains: list[ProteinChain], results: list[FoldResult], scores: dict) -> list[dict]:
    """The first REPORT_CHAINS validation chains as fold_sections wants them (prediction superposed on truth)."""
    from layerwise.tasks.structure_metrics import superpose

    shown = []
    for i, (chain, result) in enumerate(zip(chains[:REPORT_CHAINS], results, strict=False)):
        n = len(result.coords)
        true = torch.from_numpy(chain.ca[:n]).float()[None]
        mask = torch.from_numpy(chain.mask[:n])[None]
        aligned = superpose(torch.from_numpy(result.coords).float()[None], true, mask)[0].numpy()
        shown.append({
            "name": chain.name, "sequence": result.sequence, "true": chain.ca[:n], "predicted": aligned,
            "mask": chain.mask[:n], "plddt": result.plddt, "lddt": scores["residue_lddt"][i],
            "metrics": {key: scores[key][i] for key in METRIC_KEYS},
        })  # fmt: skip
    return shown


def read_and_split(
    data: Path, val_fraction: float, seed: int, log=print
) -> tuple[list[ProteinChain], list[ProteinChain], list[Problem], dict, dict]:
    """The protein chains of the structure files under `data`, split so that no validation chain shares more than
    MAX_IDENTITY with a training chain: (train, val, problems, counts, split)."""
    from layerwise.data.similarity import split_by_similarity
    from layerwise.data.structures import read_structures

    chains, problems, counts = read_structures(Path(data))
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if k not in ("files", "chains") and v)
    log(
        f"{data}: {counts['chains']} protein chains from {counts['files']} files" + (f" ({skipped})" if skipped else "")
    )
    if len(chains) < 2:
        raise InputError(
            f"{data}: {len(chains)} usable protein chain(s); at least 2 are needed to hold one out"
            + "".join(f"\n  {p.origin}: {p.reason}" for p in problems[:10])
        )
    # Refuses (InputError) when every chain is one family: nothing could be held out without leaking.
    train_index, val_index, split = split_by_similarity([c.sequence for c in chains], val_fraction, seed, MAX_IDENTITY)
    train, val = [chains[i] for i in train_index], [chains[i] for i in val_index]
    log(f"split: {len(train)} training, {len(val)} validation chains; {split['rule']}")
    return train, val, problems, counts, split


# A packed structure set (besides index.json): each split's chains in one safetensors file (see templates_to_bytes).
PACKED_CHAINS = {"train": "train-chains.safetensors", "val": "val-chains.safetensors"}


def pack_structures(data: Path, staging: Path, val_fraction: float, seed: int, log=print) -> dict:
    """`layerwise pack DATA --task fold`: the structure files read and the identity split made once (the split
    aligns every similar pair: the costly part of preparing a fold run); returns index.json's task entries."""
    train, val, problems, counts, split = read_and_split(data, val_fraction, seed, log)
    for name, chains in (("train", train), ("val", val)):
        (staging / PACKED_CHAINS[name]).write_bytes(templates_to_bytes(chains))
    return {
        "task": "fold", "modality": "protein", "source": str(data), "units": "chains",
        "n_train": len(train), "n_val": len(val),
        "val_fraction": val_fraction, "seed": seed, "counts": counts, "split": split,
        "shards": [{"file": PACKED_CHAINS[name], "split": name, "count": n}
                   for name, n in (("train", len(train)), ("val", len(val)))],
        "skipped": [p.to_json() for p in problems],
    }  # fmt: skip


def packed_chains(
    data: Path, index: dict, log=print
) -> tuple[list[ProteinChain], list[ProteinChain], list[Problem], dict, dict]:
    """The chains and split of a folder `pack_structures` wrote (its `index`), as `read_and_split` returns them."""
    chains = {}
    for shard in index["shards"]:
        path = Path(data) / shard["file"]
        try:
            chains[shard["split"]] = templates_from_bytes(path.read_bytes())
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise InputError(f"{path}: not a readable packed chain file ({err}); pack it again") from err
        if len(chains[shard["split"]]) != shard["count"]:
            raise InputError(f"{path}: {len(chains[shard['split']])} chains, index.json lists {shard['count']}")
    log(f"{data}: {index['n_train']} + {index['n_val']} packed protein chains; {index['split']['rule']}")
    problems = [Problem(p["path"], p["reason"]) for p in index["skipped"]]
    return chains["train"], chains["val"], problems, index["counts"], index["split"]


def templates_to_bytes(chains: list[ProteinChain]) -> bytes:
    """The training chains as one safetensors file (no pickle): coordinates, masks, offsets; names and
    sequences in its JSON metadata."""
    lengths = np.array([len(c.sequence) for c in chains], dtype=np.int64)
    arrays = {
        "ca": np.concatenate([c.ca for c in chains]).astype(np.float32),
        "mask": np.concatenate([c.mask for c in chains]).astype(np.uint8),
        "lengths": lengths,
    }
    meta = {"names": json.dumps([c.name for c in chains]), "sequences": json.dumps([c.sequence for c in chains]),
            "origins": json.dumps([c.origin for c in chains])}  # fmt: skip
    return save_arrays(arrays, metadata=meta)


def templates_from_bytes(content: bytes) -> list[ProteinChain]:
    arrays = load_arrays(content)
    meta = _metadata(content)
    names, sequences = json.loads(meta["names"]), json.loads(meta["sequences"])
    origins = json.loads(meta["origins"]) if "origins" in meta else ["templates"] * len(names)  # older runs
    ends = np.cumsum(arrays["lengths"])
    starts = ends - arrays["lengths"]
    return [
        ProteinChain(name, origin, seq, arrays["ca"][s:e], arrays["mask"][s:e].astype(bool))
        for name, origin, seq, s, e in zip(names, origins, sequences, starts, ends, strict=True)
    ]


def _metadata(content: bytes) -> dict:
    """safetensors' JSON header metadata (the numpy loader returns only the arrays)."""
    size = int.from_bytes(content[:8], "little")
    return json.loads(content[8 : 8 + size]).get("__metadata__", {})
