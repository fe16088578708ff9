"""Classification: one label per input file or text (image, audio or text classes).

Targets are class indices read from class folders or a CSV `label` column; the head is pooling + a
linear layer; the loss is cross-entropy; the monitor is accuracy; the decoder is top-k; the honest
baseline is logistic regression on features the front end gives without learning.
"""

from __future__ import annotations

import html
import json
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerwise.data.batches import TensorBatches
from layerwise.data.frontend import FrontEnd, fit_frontend, frontend_from_json
from layerwise.data.shards import (
    DEFAULT_SHARD_SIZE,
    ShardBatches,
    is_shard_folder,
    load_shard,
    load_split,
    read_pack,
    write_shards,
)
from layerwise.data.sources import Example, Problem, Source, check_trainable, discover, discover_files, problems_note
from layerwise.errors import InputError
from layerwise.models.registry import Pretrained, model_entry
from layerwise.runtime import predict_embeddings, predict_logits
from layerwise.shift.reference import (
    MIN_REFERENCE,
    SHIFT_FILE,
    Calibration,
    ShiftReference,
    calibrate,
    fit_reference,
)
from layerwise.tasks.base import (
    Batches,
    FitOptions,
    PackOptions,
    Prepared,
    RunMismatch,
    default_batch_size,
    fingerprint,
    result_rows,
)

PREDICT_BATCH = 256
PREDICT_CHUNK = 1024  # files decoded at once by predict_stream: bounds memory for directories of any size
VAL_BATCH = 512
ADAPT_BATCH = 128  # batch statistics of 128 inputs are stable; TENT takes one step per batch
MAX_REPORT_EXAMPLES = 12
MAX_GAUSSIAN_FIT = 5000  # training embeddings the OOD score's class Gaussians are fitted on
PACKED_TRAIN_SAMPLE = 20_000  # packed training examples read into memory for the classical baseline and shift fits
REPORT_ROBUSTNESS_EXAMPLES = 1000  # validation inputs the report's robustness table is measured on


def log_stderr(message: str) -> None:
    """Progress notes of analysis commands: stderr, so that `--json` output on stdout stays one document."""
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    confidence: float  # calibrated (temperature-scaled) when the run has a calibration
    top_k: list[tuple[str, float]]
    ood_score: float | None = None  # None for runs trained before shift detection existed
    ood: bool | None = None

    def to_json(self) -> dict:
        document = {
            "path": self.path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "top_k": [{"label": label, "confidence": round(p, 6)} for label, p in self.top_k],
        }
        if self.ood is not None:
            document |= {"ood": self.ood, "ood_score": round(self.ood_score, 4)}
        return document

    def to_line(self) -> str:
        others = ", ".join(f"{label} {p:.2f}" for label, p in self.top_k[1:])
        flag = "\tOUT-OF-DISTRIBUTION" if self.ood else ""
        return f"{self.path}\t{self.label}\t{self.confidence:.3f}\t{others}{flag}"


class CrossEntropyObjective:
    """Cross-entropy with label smoothing, monitored by accuracy; also the loop's default objective."""

    monitor = "accuracy"
    higher_is_better = True

    def __init__(self, label_smoothing: float = 0.1) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = model(inputs).float()  # (B, classes)
        loss = nn.functional.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        # A tensor, not a float: the loop reads it back when it settles the step (on a GPU, not after every step).
        return loss, {"accuracy": (logits.argmax(1) == targets).float().mean().detach()}

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        logits, labels = predict_logits(model, batches)
        return {
            "loss": float(nn.functional.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
        }


class ClassifyTask(CrossEntropyObjective):
    """A fitted classification task: the front end (preprocessing) and the class labels."""

    name = "classify"
    commands = frozenset({"predict", "evaluate", "explain", "layers", "shift", "robustness", "adapt"})
    learning_curves = True  # `layerwise curve` measures this task; a run's report shows one (`train --curve`)
    decodes_bytes = True  # its front ends decode `Example.data`: `serve` hands uploads over without temp files

    def __init__(
        self, frontend: FrontEnd, class_names: list[str], label_smoothing: float = 0.1, calibration: dict | None = None
    ) -> None:
        super().__init__(label_smoothing)
        self.frontend = frontend
        self.class_names = class_names
        self.calibration = calibration  # {"temperature", "ece_before", "ece_after"} once fitted
        self.shift_reference: ShiftReference | None = None  # RUN/shift.safetensors
        self.calibration_detail: Calibration | None = None  # the reliability bins, for the report
        self.robustness_result: dict | None = None  # the corruption suite on validation data, for the report
        self.robustness_error: str | None = None

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    @property
    def modality(self) -> str:
        return self.frontend.modality

    def to_json(self) -> dict:
        document = {
            "modality": self.modality,
            "preprocessing": self.frontend.to_json(),
            "class_labels": self.class_names,
        }
        if self.calibration:
            document["calibration"] = self.calibration
        return document

    @classmethod
    def from_config(cls, config: dict) -> ClassifyTask:
        return cls(
            frontend_from_json(config["preprocessing"]), list(config["class_labels"]),
            calibration=config.get("calibration"),
        )  # fmt: skip

    def run_files(self) -> dict[str, bytes]:
        return {SHIFT_FILE: self.shift_reference.to_bytes()} if self.shift_reference is not None else {}

    def load_run_files(self, run_dir: Path) -> None:
        """Read RUN/shift.safetensors when the run has one (runs trained before shift detection do not)."""
        if (run_dir / SHIFT_FILE).is_file():
            self.shift_reference = ShiftReference.load(run_dir / SHIFT_FILE)

    # ------------------------------------------------------------------ training data

    @classmethod
    def prepare(cls, data: Path, options: FitOptions, saved: dict | None = None, donor=None, log=print) -> Prepared:
        """Discover, split and decode the data; fit (or, resuming, restore) the preprocessing."""
        if is_shard_folder(data):
            return cls.prepare_packed(data, options, saved, donor, log)
        modality = saved["modality"] if saved else options.modality
        source = discover(data, modality)
        if saved:
            check_same_classes(source, saved["class_labels"])
        if donor is not None and donor.task.modality != source.modality:  # before decoding all the data
            raise InputError(
                f"--init: that run learned from {donor.task.modality}, {source.root} holds {source.modality}; "
                "give a run of the same modality"
            )
        train_examples, val_examples = stratified_split(source.examples, options.val_fraction, options.seed)
        # Chosen before the front end is fitted: a pretrained backbone brings its own tokenizer.
        early_model = options.model or pretrained_default(source.modality, len(train_examples), donor)
        if saved:
            frontend = frontend_from_json(saved["preprocessing"])
        elif donor is not None and donor.task.modality == source.modality:
            frontend = donor.task.frontend  # the donor's tokenizer / statistics: its weights expect them
            log("preprocessing (tokenizer, sizes, statistics) taken from the --init run")
        else:
            frontend = fit_model_frontend(early_model, source.modality, train_examples)
        log(f"{source.root}: {len(source.examples)} {source.modality} examples, {len(source.class_names)} classes")
        decode_started = time.perf_counter()
        train_inputs, kept, train_problems = frontend.decode_all(train_examples)
        train_examples = [train_examples[i] for i in kept]
        val_inputs, kept, val_problems = frontend.decode_all(val_examples)
        val_examples = [val_examples[i] for i in kept]
        decode_seconds = time.perf_counter() - decode_started
        problems = source.problems + train_problems + val_problems
        check_trainable([ex.label for ex in train_examples + val_examples], source.class_names, source.root)
        if not val_examples:
            raise InputError(f"{source.root}: too few usable examples to hold any out for validation")
        class_names = saved["class_labels"] if saved else sorted({ex.label for ex in train_examples + val_examples})
        index = {name: i for i, name in enumerate(class_names)}
        train_labels = torch.tensor([index[ex.label] for ex in train_examples])
        val_labels = torch.tensor([index[ex.label] for ex in val_examples])
        if not saved and (donor is None or frontend is not donor.task.frontend):
            frontend.fit_statistics(train_inputs)
        data_summary = {
            "source": str(source.root), "n_train": len(train_examples), "n_val": len(val_examples),
            "n_skipped": len(problems), "val_fraction": options.val_fraction,
            "fingerprint": fingerprint(
                [f"train {example_key(e, source.root)}" for e in train_examples]
                + [f"val {example_key(e, source.root)}" for e in val_examples]
            ),
        }  # fmt: skip
        if saved:
            check_same_data(saved["data"], data_summary, source.root)
        model_name = early_model or default_model(source.modality, frontend, len(train_examples))

        def train_batches(batch: int) -> TensorBatches:
            return TensorBatches(
                train_inputs, train_labels, batch, frontend.model_input, frontend.augment, shuffle=True,
                seed=options.seed,
            )  # fmt: skip

        return cls.assemble(
            frontend, class_names, model_name, len(train_examples), options, train_batches, data_summary, problems,
            extras={
                "train_inputs": train_inputs,
                "train_labels": train_labels,
                "val_inputs": val_inputs,
                "val_labels": val_labels,
                "val_examples": val_examples,
                "decode_seconds": decode_seconds,
                "split": f"validation: {options.val_fraction:.0%} of the data, stratified, seed {options.seed} "
                "(also used for early stopping)",
            },
        )  # fmt: skip

    @classmethod
    def pack_into(cls, data: Path, staging: Path, options: PackOptions, log=print) -> dict:
        """`layerwise pack` for classification: the stratified split, the preprocessing fitted on the training part,
        the decoded examples in shards of `shard_size` (see data/shards.py); returns index.json's entries."""
        source = discover(data, options.modality)
        train_examples, val_examples = stratified_split(source.examples, options.val_fraction, options.seed)
        frontend = fit_frontend(source.modality, train_examples)
        shard_size = options.shard_size or DEFAULT_SHARD_SIZE
        shards, kept, problems = write_shards(
            staging,
            {"train": train_examples, "val": val_examples},
            source.class_names,
            frontend,
            shard_size,
            options.seed,
            log,
        )
        problems = source.problems + problems
        check_trainable([ex.label for split in kept.values() for ex in split], source.class_names, source.root)
        if not kept["val"]:
            raise InputError(f"{source.root}: too few usable examples to hold any out for validation")
        if not kept["train"]:
            raise InputError(f"{source.root}: no usable training examples to pack")
        # Statistics (an image's per-channel mean and std) from the first training shard: a random sample.
        first_train = next(shard for shard in shards if shard["split"] == "train")
        frontend.fit_statistics(load_shard(staging, first_train)[0])
        return {
            "modality": source.modality, "source": str(source.root), "units": "examples",
            "preprocessing": frontend.to_json(), "class_labels": source.class_names,
            "n_train": len(kept["train"]), "n_val": len(kept["val"]), "val_fraction": options.val_fraction,
            "seed": options.seed, "shard_size": shard_size, "shards": shards,
            "fingerprint": fingerprint(
                [f"{split} {example_key(e, source.root)}" for split, examples in kept.items() for e in examples]
            ),
            "val_examples": [
                {"origin": e.origin, "label": e.label, "path": str(e.path) if e.path else None, "text": e.text}
                for e in kept["val"]
            ],
            "skipped": [p.to_json() for p in problems],
        }  # fmt: skip

    @classmethod
    def prepare_packed(cls, data: Path, options: FitOptions, saved: dict | None, donor, log=print) -> Prepared:
        """Training data `layerwise pack` wrote: the split, preprocessing and problems were decided there;
        the training shards are streamed, the validation split and a sample of training examples (for the
        baseline and the shift reference) are read into memory."""
        index = read_pack(data, "classify", options.val_fraction, log)
        modality = index["modality"]
        if options.modality not in (None, modality):
            raise InputError(f"--modality {options.modality}: {data} holds packed {modality} examples")
        if donor is not None:
            raise InputError(
                f"--init with packed data: {data} was packed with its own preprocessing, which the --init run's "
                "weights do not expect; train from the raw files with --init instead"
            )
        class_names = list(index["class_labels"])
        if saved:
            check_same_data(saved["data"], {"fingerprint": index["fingerprint"], "n_train": index["n_train"],
                                            "n_val": index["n_val"]}, Path(data))  # fmt: skip
        frontend = frontend_from_json(saved["preprocessing"] if saved else index["preprocessing"])
        train_shards = [shard for shard in index["shards"] if shard["split"] == "train"]
        val_shards = [shard for shard in index["shards"] if shard["split"] == "val"]
        val_inputs, val_labels = load_split(data, val_shards)
        train_sample, train_sample_labels = load_split(data, train_shards, limit=PACKED_TRAIN_SAMPLE)
        val_examples = [
            Example(e["origin"], e["label"], Path(e["path"]) if e["path"] else None, e.get("text"))
            for e in index["val_examples"]
        ]
        problems = [Problem(p["path"], p["reason"]) for p in index["skipped"]]
        log(f"{data}: {index['n_train']} + {index['n_val']} packed {modality} examples in "
            f"{len(index['shards'])} shards, {len(class_names)} classes")  # fmt: skip
        data_summary = {
            "source": str(data), "packed_from": index["source"], "n_train": index["n_train"], "n_val": index["n_val"],
            "n_skipped": len(problems), "val_fraction": index["val_fraction"], "fingerprint": index["fingerprint"],
        }  # fmt: skip
        model_name = options.model or default_model(modality, frontend, index["n_train"])
        pretrained = model_entry(model_name).pretrained
        if pretrained is not None and pretrained.fit_frontend is not None:
            raise InputError(
                f"--model {model_name} reads text with its own tokenizer, and {data} was packed with another; "
                "train it from the raw data"
            )

        def train_batches(batch: int) -> ShardBatches:
            return ShardBatches(
                data, train_shards, batch, frontend.model_input, frontend.augment, shuffle=True, seed=options.seed
            )

        return cls.assemble(
            frontend, class_names, model_name, index["n_train"], options, train_batches, data_summary, problems,
            extras={
                "train_inputs": train_sample,  # a sample: the classical baseline and shift reference fit on it
                "train_labels": train_sample_labels,
                "val_inputs": val_inputs,
                "val_labels": val_labels,
                "val_examples": val_examples,
                "split": f"validation: {index['val_fraction']:.0%} of the data, stratified, seed {index['seed']}, "
                "fixed when it was packed (also used for early stopping)",
            },
        )  # fmt: skip

    @classmethod
    def assemble(
        cls, frontend: FrontEnd, class_names: list[str], model_name: str, n_train: int, options: FitOptions,
        train_batches: Callable[[int], Batches], data_summary: dict, problems: list[Problem], extras: dict,
    ) -> Prepared:  # fmt: skip
        """The prepared task once the data is read: the model's settings, the batch size, the batches."""
        model_config = model_overrides(model_name, frontend.modality, frontend) | {"num_classes": len(class_names)}
        recipe = fine_tuning_recipe(model_name)  # lr, batch size, patience of a pretrained model; {} otherwise
        recipe_batch = recipe.pop("batch_size", None)  # a pretrained model's tuned batch: not searched on a GPU
        batch = options.batch_size or recipe_batch or default_batch_size(n_train)
        return Prepared(
            task=cls(frontend, class_names),
            train_batches=train_batches(batch),
            val_batches=TensorBatches(extras["val_inputs"], extras["val_labels"], VAL_BATCH, frontend.model_input),
            model_name=model_name,
            model_config=model_config,
            data_summary=data_summary,
            problems=problems,
            batch_size=batch,
            **recipe,
            extras=extras,
            batches_of=None if recipe_batch else train_batches,
        )

    # ------------------------------------------------------------------ after training

    def final_metrics(self, network: nn.Module, prepared: Prepared) -> dict[str, float]:
        embeddings, logits, labels = predict_embeddings(network, prepared.val_batches)
        prepared.extras["val_logits"] = logits
        prepared.extras["val_embeddings"] = embeddings  # calibrate() reuses this pass
        return classification_metrics(logits, labels, len(self.class_names))

    def calibrate(self, network: nn.Module, prepared: Prepared, log=print) -> None:
        """Fit temperature scaling and the shift reference (drift sample, OOD score, accuracy estimate) on the
        validation split; the corruption suite run for the accuracy estimate is also the report's robustness table."""
        extras = prepared.extras
        embeddings, logits, labels = extras["val_embeddings"], extras["val_logits"], extras["val_labels"]
        if len(labels) < MIN_REFERENCE:
            log(f"note: {len(labels)} validation examples are too few to calibrate confidences and shift detection "
                f"(at least {MIN_REFERENCE}); confidences are uncalibrated and `layerwise shift` will need "
                "--fit-reference")  # fmt: skip
            return
        train_embeddings, _, train_labels = predict_embeddings(network, self.sample_batches(
            extras["train_inputs"], extras["train_labels"], MAX_GAUSSIAN_FIT, seed=0
        ))  # fmt: skip
        self.set_reference(embeddings, logits, labels, train_embeddings, train_labels)
        log(f"calibration: temperature {self.temperature:.2f}, expected calibration error "
            f"{self.calibration['ece_before']:.3f} -> {self.calibration['ece_after']:.3f}; "
            f"shift reference: {len(self.shift_reference.embeddings)} validation embeddings")  # fmt: skip
        self.fit_accuracy_estimate(network, extras["val_examples"], log)

    def fit_accuracy_estimate(self, network: nn.Module, examples: list[Example], log=log_stderr) -> None:
        """Run the corruption suite on (a sample of) labelled held-out `examples` and fit the label-free
        accuracy estimate on its cells. A failure leaves the ATC estimate in place and is reported."""
        from layerwise.shift.estimate import fit_accuracy_model
        from layerwise.shift.robustness import summarise

        try:
            started = time.perf_counter()
            keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
            sample = [examples[i] for i in keep[:REPORT_ROBUSTNESS_EXAMPLES].sort().values.tolist()]
            result, cells = self.measure_robustness(network, sample)
            model = fit_accuracy_model([c.features for c in cells], [c.accuracy for c in cells],
                                       [c.corruption for c in cells])  # fmt: skip
            self.shift_reference = replace(self.shift_reference, accuracy_model=model)
            self.robustness_result = result = summarise(self.modality, cells, self.shift_reference, result["n"])
            log(
                f"robustness: {result['clean']:.1%} clean, {result['mean_corrupted']:.1%} mean under "
                f"{len(result['corruptions'])} corruptions x 5 severities; label-free accuracy estimate fitted "
                f"(error {model.held_out_error:.1%} on unseen corruptions) ({time.perf_counter() - started:.1f} s)"
            )
        except Exception as err:  # noqa: BLE001 - the run must not be lost to an analysis
            self.robustness_error = f"{type(err).__name__}: {err}"
            log(f"warning: the corruption suite failed ({self.robustness_error}); accuracy estimates use ATC")

    def set_reference(self, embeddings, logits, labels, train_embeddings=None, train_labels=None) -> None:
        calibration = calibrate(logits, labels)
        self.calibration = calibration.to_json()
        self.calibration_detail = calibration
        self.shift_reference = fit_reference(
            embeddings, logits, labels, calibration.temperature, train_embeddings, train_labels
        )

    def sample_batches(self, inputs: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0) -> TensorBatches:
        """Batches of a seeded random sample of at most `n` cached inputs (all of them when fewer)."""
        keep = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return TensorBatches(inputs[keep], labels[keep], PREDICT_BATCH, self.frontend.model_input)

    def baseline(self, prepared: Prepared, seed: int) -> dict:
        from layerwise.baseline import fit_baseline

        extras = prepared.extras
        return fit_baseline(
            self.modality,
            self.frontend.baseline_features(extras["train_inputs"]),
            extras["train_labels"].numpy(),
            self.frontend.baseline_features(extras["val_inputs"]),
            extras["val_labels"].numpy(),
            seed=seed,
        )

    def verdict(self, metrics: dict, baseline: dict, approach: str = "from scratch") -> str:
        from layerwise.baseline import verdict

        return verdict(metrics["accuracy"], baseline.get("accuracy"), approach=approach)

    def summary_rows(self, summary: dict) -> list[tuple[str, str]]:
        return result_rows(summary, "accuracy", lambda v: f"{v:.2%}")

    def write_report(self, run_dir: Path, bundle, summary: dict, result, prepared: Prepared, log=print) -> None:
        from layerwise.explain import layers_report_section
        from layerwise.report import Example as ReportExample
        from layerwise.report import ReportData, write_report

        extras = prepared.extras
        val_logits, val_labels = extras["val_logits"], extras["val_labels"]
        probabilities = torch.softmax(val_logits / self.temperature, 1)
        wrong = (val_logits.argmax(1) != val_labels).nonzero().flatten().tolist()
        wrong.sort(key=lambda i: -float(probabilities[i].max()))  # confidently wrong first
        examples = []
        for i in wrong[:MAX_REPORT_EXAMPLES]:
            preview = self.frontend.preview(extras["val_inputs"][i])
            examples.append(
                ReportExample(
                    path=extras["val_examples"][i].origin,
                    true_label=extras["val_examples"][i].label,
                    predicted_label=self.class_names[int(val_logits[i].argmax())],
                    confidence=float(probabilities[i].max()),
                    preview_png=preview if isinstance(preview, bytes) else None,
                    text=preview if isinstance(preview, str) else None,
                )
            )
        data = ReportData(
            title=f"layerwise run: {Path(bundle.config['data']['source']).name}",
            summary=report_summary(bundle.config, summary),
            history=result.history,
            class_names=self.class_names,
            confusion=confusion(val_logits, val_labels, len(self.class_names)).tolist(),
            metrics=summary["metrics"],
            baseline=summary["baseline"],
            verdict=summary["verdict"],
            examples=examples,
            problems=[p.to_json() for p in prepared.problems],
            extra_sections=[
                *self.trust_sections(),
                layers_report_section(bundle, extras["val_inputs"], val_labels, log=log),
                *curve_sections(run_dir),
            ],
        )
        write_report(run_dir / "report.html", data)

    def trust_sections(self) -> list[tuple[str, str]]:
        """Calibration and robustness sections of report.html, from what `calibrate` measured."""
        from layerwise.report.shift_sections import calibration_html, robustness_html
        from layerwise.shift.robustness import robustness_png

        sections = []
        if self.calibration_detail is not None:
            sections.append(("Calibration", calibration_html(self.calibration_detail)))
        if self.robustness_result is not None:
            model = self.shift_reference.accuracy_model if self.shift_reference is not None else None
            html_fragment = robustness_html(self.robustness_result, robustness_png(self.robustness_result), model)
            sections.append(("Robustness to corruptions", html_fragment))
        elif self.robustness_error is not None:
            reason = html.escape(self.robustness_error)
            sections.append(("Robustness to corruptions", f'<p class="empty">Not available: {reason}</p>'))
        return sections

    def explain(self, bundle, inputs: list, out_dir: Path, methods: tuple[str, ...], target: str | None,
                texts: list[str] | None, box: int = 1) -> tuple[dict, list[Problem], list[str]]:  # fmt: skip
        """`layerwise explain`: attribution maps per input and method; the document, problems and output lines."""
        from layerwise.explain.run import explain_inputs

        document, problems = explain_inputs(bundle, inputs, out_dir, methods, target, texts=texts)
        lines = [
            f"{r['path']}\t{r['predicted']}\t{r['confidence']:.3f}\t{r['target']}\t"
            + ", ".join(str(out_dir / name) for name in r["files"].values())
            for r in document["explanations"]
        ]
        lines.append(
            f"{len(document['explanations'])} input(s) explained in {document['seconds']:.2f} s "
            f"({document['seconds_per_input']:.2f} s each); scores in {out_dir / 'explanations.json'}"
        )
        return document, problems, lines

    # ------------------------------------------------------------------ inference

    def logits(self, network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Cached front-end tensors (N, ...) -> logits (N, classes)."""
        return predict_logits(network, self.batches(inputs))[0]

    def embeddings_and_logits(self, network: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached front-end tensors (N, ...) -> pooled embeddings (N, D) and logits (N, classes), in one pass."""
        embeddings, logits, _ = predict_embeddings(network, self.batches(inputs))
        return embeddings, logits

    def batches(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> TensorBatches:
        labels = torch.zeros(len(inputs), dtype=torch.int64) if labels is None else labels
        return TensorBatches(inputs, labels, PREDICT_BATCH, self.frontend.model_input)

    def find_inputs(
        self, inputs: list[str | Path], texts: list[str] | None = None
    ) -> tuple[list[Example], list[Problem]]:
        """Files and folders (searched recursively), and raw `texts` for a text model.

        For backward compatibility a str input to a text model that does not exist and does not look
        like a path (no known extension, no path separator) is a raw text; one that looks like a path
        is an error naming it, so a mistyped file name is never classified as text.
        """
        examples: list[Example] = []
        paths: list[Path] = []
        for item in inputs:
            if isinstance(item, str) and not Path(item).exists() and not looks_like_path(item):
                if self.modality != "text":
                    raise InputError(f"{item}: no such file or directory")
                texts = [*(texts or []), item]
            else:
                paths.append(Path(item))
        if texts and self.modality != "text":
            raise InputError(f"--text: this run classifies {self.modality}, not text")
        for i, text in enumerate(texts or []):
            if not text.strip():
                raise InputError(f"--text #{i + 1}: empty text")
            examples.append(Example(origin=text[:60], label=None, text=text))
        problems: list[Problem] = []
        if paths:
            found = discover_files(paths, self.modality)
            examples += found.examples
            problems += found.problems
        return examples, problems

    def predict(
        self, network: nn.Module, inputs: list[str | Path], texts: list[str] | None = None, k: int = 3
    ) -> tuple[list[Prediction], list[Problem]]:
        examples, problems = self.find_inputs(inputs, texts)
        predictions = []
        for result in self.predict_stream(network, examples, k):
            (predictions if isinstance(result, Prediction) else problems).append(result)
        return predictions, problems

    def predict_stream(
        self, network: nn.Module, examples: list[Example], k: int = 3, chunk: int = PREDICT_CHUNK
    ) -> Iterator[Prediction | Problem]:
        """A prediction (or the problem) per example, in input order, decoding `chunk` files at a time.

        Memory is bounded by the chunk, whatever the number of inputs; the front end decodes each chunk
        in worker processes when it is large.
        """
        for start in range(0, len(examples), chunk):
            part = examples[start : start + chunk]
            tensors, kept, problems = self.frontend.decode_all(part)
            by_origin = {problem.origin: problem for problem in problems}
            predictions = iter(self.decode(network, tensors, [part[i].origin for i in kept], k) if kept else [])
            kept_set = set(kept)
            for i, example in enumerate(part):
                yield next(predictions) if i in kept_set else by_origin[example.origin]

    def decode(self, network: nn.Module, tensors: torch.Tensor, origins: list[str], k: int) -> list[Prediction]:
        """Calibrated top-k predictions, with the out-of-distribution score when the run has a shift reference."""
        if self.shift_reference is None:
            return decode(self.logits(network, tensors), self.class_names, origins, k, self.temperature)
        embeddings, logits = self.embeddings_and_logits(network, tensors)
        scores = self.shift_reference.ood.score(embeddings).tolist()
        threshold = self.shift_reference.ood_threshold
        return [
            replace(p, ood_score=score, ood=score > threshold)
            for p, score in zip(decode(logits, self.class_names, origins, k, self.temperature), scores, strict=True)
        ]

    # ------------------------------------------------------------------ shift

    def read_new_data(self, data: str | Path) -> tuple[list[Example], list[int] | None, list[Problem]]:
        """Inputs for the shift tools: labelled (class folders or a CSV with `label`) when the labels are this
        run's classes, else unlabelled (a flat folder or file list). Refuses data of another modality."""
        root = Path(data)
        if not root.exists():
            raise InputError(f"{root}: no such file or directory")
        found = discover_files([root])
        if found.modality != self.modality and found.examples:
            raise InputError(f"{root}: holds {found.modality} inputs, but this run classifies {self.modality}")
        try:
            source = discover(root, self.modality)
        except InputError:
            source = None  # no class folders or label column: unlabelled
        if source is not None and any(ex.label in self.class_names for ex in source.examples):
            examples, labels, problems = self.labelled_examples(source)
            return examples, labels, problems
        unlabelled = discover_files([root], self.modality)
        return unlabelled.examples, None, unlabelled.problems

    def embed_data(self, network: nn.Module, data: str | Path) -> dict:
        """Decode `data` and run the network once: embeddings, logits, labels (or None), cached inputs, problems."""
        examples, labels, problems = self.read_new_data(data)
        raw, kept, decode_problems = self.frontend.decode_raw(examples)
        problems = problems + decode_problems
        if not kept:
            raise InputError(f"{data}: no decodable {self.modality} input")
        inputs = self.frontend.encode_raw(raw)
        embeddings, logits = self.embeddings_and_logits(network, inputs)
        return {
            "embeddings": embeddings, "logits": logits, "inputs": inputs, "examples": [examples[i] for i in kept],
            "labels": None if labels is None else torch.tensor([labels[i] for i in kept]), "problems": problems,
        }  # fmt: skip

    def fit_reference_from(self, network: nn.Module, data: str | Path, log=log_stderr) -> dict:
        """`shift --fit-reference`: calibration and shift reference from labelled held-out data (older runs)."""
        embedded = self.embed_data(network, data)
        if embedded["labels"] is None:
            raise InputError(
                f"{data}: --fit-reference needs labelled held-out data (class folders or a CSV with a 'label' "
                "column) that the run was not trained on"
            )
        self.set_reference(embedded["embeddings"], embedded["logits"], embedded["labels"])
        self.fit_accuracy_estimate(network, embedded["examples"], log=log)
        return embedded

    def detect_shift(self, network: nn.Module, data: str | Path, seed: int = 0):
        """`layerwise shift`: a `ShiftResult` for `data`, and the inputs that could not be used."""
        from layerwise.shift.drift import detect_shift

        self.require_reference()
        embedded = self.embed_data(network, data)
        try:
            result = detect_shift(
                self.shift_reference, embedded["embeddings"], embedded["logits"], self.temperature,
                embedded["labels"], seed=seed,
            )  # fmt: skip
        except InputError as err:
            note = problems_note(embedded["problems"])
            raise InputError(f"{err}; {note}" if note else str(err)) from None
        return result, embedded["problems"]

    def require_reference(self) -> None:
        if self.shift_reference is None:
            raise InputError(
                "this run has no shift reference (it was trained before shift detection, on too little validation "
                "data, or adapted with `layerwise adapt`); add one from labelled held-out data: "
                "layerwise shift --fit-reference RUN DATA"
            )

    def measure_robustness(self, network: nn.Module, examples: list[Example], seed: int = 0):
        """Accuracy on labelled `examples` clean and under every corruption of the modality at 5 severities:
        the result document and its cells."""
        from layerwise.shift.robustness import measure_robustness

        index = {name: i for i, name in enumerate(self.class_names)}
        raw, kept, _ = self.frontend.decode_raw(examples)
        if not kept:
            raise InputError("no decodable labelled input to measure robustness on")
        labels = torch.tensor([index[examples[i].label] for i in kept])
        return measure_robustness(
            self.modality, raw, labels, self.frontend.encode_raw, lambda x: self.embeddings_and_logits(network, x),
            temperature=self.temperature, reference=self.shift_reference,
            sample_rate=getattr(getattr(self.frontend, "prep", None), "sample_rate", 16000), seed=seed,
        )  # fmt: skip

    def robustness(self, network: nn.Module, data: str | Path, max_examples: int, seed: int = 0):
        """`layerwise robustness`: the result dict and the inputs that could not be used."""
        examples, labels, problems = self.read_new_data(data)
        if labels is None:
            raise InputError(f"{data}: robustness needs labelled data (class folders or a CSV with a 'label' column)")
        if len(examples) > max_examples:
            keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
            examples = [examples[i] for i in keep]
        return self.measure_robustness(network, examples, seed)[0], problems

    def adapt(self, network: nn.Module, data: str | Path) -> dict:
        """`layerwise adapt`: adapt `network` in place to the inputs of `data`; accuracy before/after with labels."""
        from layerwise.shift.adapt import adapt

        embedded = self.embed_data(network, data)
        inputs = embedded["inputs"]
        labels = embedded["labels"]
        before = None if labels is None else float((embedded["logits"].argmax(1) == labels).float().mean())
        shuffled = TensorBatches(inputs, torch.zeros(len(inputs), dtype=torch.int64), ADAPT_BATCH,
                                 self.frontend.model_input, shuffle=True, seed=0)  # fmt: skip
        method = adapt(network, (x for x, _ in shuffled.epoch(0)))
        after = None if labels is None else float((self.logits(network, inputs).argmax(1) == labels).float().mean())
        return {"method": method, "n": len(inputs), "accuracy_before": before, "accuracy_after": after,
                "problems": embedded["problems"]}  # fmt: skip

    # ------------------------------------------------------------------ export

    def example_inputs(self, data: Path, n: int, network: nn.Module) -> torch.Tensor:
        """Model inputs (n, ...) of up to `n` decodable files spread over `data`, for export's parity check."""
        source = discover(data, self.modality, labelled=False)
        examples = source.examples[:: max(1, len(source.examples) // n)][:n]
        tensors, kept, _ = self.frontend.decode_all(examples)
        if not kept:
            raise InputError(f"{data}: no decodable {self.modality} input to check the export with")
        return self.frontend.model_input(tensors)

    def max_sequence_length(self, network: nn.Module) -> int:
        return int(self.frontend.model_inputs.get("max_len", 0))

    def output_meaning(self) -> str:
        return (
            "logits (batch, classes) in the order of class_labels; softmax(logits / temperature) gives the "
            f"calibrated confidences layerwise prints (temperature {self.temperature:.6g}, fitted on validation data)"
        )

    def labelled_examples(self, source: Source) -> tuple[list[Example], list[int], list[Problem]]:
        """The examples whose label is one of this model's classes, their class indices, and the rest as problems."""
        index = {name: i for i, name in enumerate(self.class_names)}
        examples, problems = [], list(source.problems)
        for example in source.examples:
            if example.label in index:
                examples.append(example)
            else:
                problems.append(Problem(example.origin, f"label {example.label!r} is not one of the model's classes"))
        return examples, [index[ex.label] for ex in examples], problems

    def evaluate_data(self, network: nn.Module, data: str | Path | Source) -> tuple[dict, list[Problem]]:
        """Metrics on labelled data (a class-folder tree or CSV manifest) and the skipped inputs."""
        source = data if isinstance(data, Source) else discover(data, self.modality)
        examples, label_ids, problems = self.labelled_examples(source)
        tensors, kept, decode_problems = self.frontend.decode_all(examples)
        problems += decode_problems
        if not kept:
            raise InputError(f"{source.root}: no usable labelled examples to evaluate")
        labels = torch.tensor([label_ids[i] for i in kept])
        return classification_metrics(self.logits(network, tensors), labels, len(self.class_names)), problems


# ---------------------------------------------------------------------- helpers


def looks_like_path(item: str) -> bool:
    """A string meant as a file: it has a path separator or ends in a known file extension."""
    from layerwise.data.sources import modality_of_extension

    suffix = Path(item).suffix
    return "/" in item or os.sep in item or modality_of_extension(suffix) is not None or suffix.lower() == ".csv"


def example_key(example: Example, root: Path) -> str:
    """An example's identity that survives moving the data folder: its relative path or its text."""
    if example.path is not None:
        base = root if root.is_dir() else root.parent
        return f"{example.label}\t{os.path.relpath(example.path, base)}"
    return f"{example.label}\t{fingerprint([example.text or ''])}"


def check_same_classes(source: Source, saved_classes: list[str]) -> None:
    missing = sorted(set(saved_classes) - set(source.class_names))
    new = sorted(set(source.class_names) - set(saved_classes))
    if missing or new:
        parts = []
        if missing:
            parts.append(f"class {', '.join(map(repr, missing))} missing")
        if new:
            parts.append(f"class {', '.join(map(repr, new))} not in the run")
        raise RunMismatch(
            f"--resume: {source.root} no longer matches the run ({'; '.join(parts)}); "
            f"the run was trained on {', '.join(saved_classes)}"
        )


def check_same_data(saved: dict, now: dict, root: Path) -> None:
    if saved.get("fingerprint") not in (None, now["fingerprint"]):
        raise RunMismatch(
            f"--resume: {root} no longer matches the run: its usable examples differ "
            f"({now['n_train']} train / {now['n_val']} validation now, {saved['n_train']} / {saved['n_val']} "
            "when the run started); resume with the same data, or train a new run"
        )


def stratified_split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `val_fraction` of each class (at least one example of any class with two or more)."""
    by_class: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_class[example.label].append(example)
    rng = random.Random(seed)
    train_part, val_part = [], []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        n_val = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val_part += members[:n_val]
        train_part += members[n_val:]
    return train_part, val_part


def default_model(modality: str, frontend: FrontEnd, n_train: int) -> str:
    """A good default per modality, from the input size and the amount of data."""
    if modality == "text":
        return "transformer_tiny" if n_train < 50_000 else "transformer_small"
    if modality == "image" and frontend.prep.side <= 48:
        return "convnet_s"  # fast and accurate on small images (Fashion-MNIST: ~93.5%)
    return "resnet_s"


PRETRAINED_TEXT_MODEL = "minilm_l6"
# Fine-tuning the pretrained encoder is the default below this many training texts. Its lead over training
# from scratch is largest where labels are few (fortunes, 720 texts: 80% vs 54%, TF-IDF 65%; benchmarks/
# text_transfer.py), and its cost grows with the data: an epoch took 0.2-0.4 s a text on two shared CPU cores
# there (6x transformer_tiny's), so 20,000 texts is 1-2 hours an epoch on a CPU (minutes on a GPU), about what
# a user still waits for; beyond it the from-scratch transformers have enough text to learn their own vocabulary.
PRETRAINED_TEXT_MAX_TRAIN = 20_000


def pretrained_default(modality: str, n_train: int, donor=None, pretrained: Pretrained | None = None) -> str | None:
    """The default model when it must be known before the front end is fitted (it brings its own tokenizer):
    with --init, the donor's own model (its weights and preprocessing fit only it: a default picked from this
    data could be another size, and nothing would transfer); else the pretrained text encoder for small text
    data when its package is installed (`pretrained`: where to look, for tests). None leaves the choice to
    `default_model`."""
    if donor is not None:
        return donor.config["model"]["name"]
    pretrained = pretrained or model_entry(PRETRAINED_TEXT_MODEL).pretrained
    if modality == "text" and n_train < PRETRAINED_TEXT_MAX_TRAIN and pretrained.installed():
        return PRETRAINED_TEXT_MODEL
    return None


def fit_model_frontend(model_name: str | None, modality: str, examples: list[Example]) -> FrontEnd:
    """The front end `model_name` reads: its own pretrained tokenizer when it has one, else one fitted to the data."""
    entry = model_entry(model_name) if model_name else None
    pretrained = entry.pretrained if entry is not None and modality in entry.modalities else None
    if pretrained is None or pretrained.fit_frontend is None:
        return fit_frontend(modality, examples)
    return pretrained.fit_frontend(examples, pretrained.files(model_name))


def fine_tuning_recipe(model_name: str) -> dict:
    """The pretrained model's lr / batch_size / patience (those it sets); {} for a model trained from scratch."""
    pretrained = model_entry(model_name).pretrained
    if pretrained is None:
        return {}
    recipe = {"lr": pretrained.lr, "batch_size": pretrained.batch_size, "patience": pretrained.patience}
    return {key: value for key, value in recipe.items() if value is not None}


def model_overrides(model_name: str, modality: str, frontend: FrontEnd) -> dict:
    """Builder arguments the data decides: input channels / vocabulary, and the stem stride."""
    entry = model_entry(model_name)
    if "classify" not in entry.tasks:
        raise InputError(f"--model {model_name} is a {'/'.join(entry.tasks)} model, not a classifier")
    if modality not in entry.modalities:
        raise InputError(
            f"--model {model_name} does not take {modality} input (it takes {', '.join(entry.modalities)})"
        )
    config = dict(frontend.model_inputs)
    if model_name.startswith("resnet"):
        # Spectrograms (64 bands x 100 frames a second) and large images are downsampled early.
        large = modality == "audio" or frontend.prep.side > 64
        config["stem_stride"] = 2 if large else 1
    return config


def write_task_report(
    run_dir: Path, bundle, summary: dict, result, prepared: Prepared, objective, baseline: dict, extra_sections: list
) -> None:
    """RUN/report.html for a task without classes: summary, curves, headline metric against `baseline`, the task's
    own `extra_sections` and the skipped inputs."""
    from layerwise.report import ReportData, write_report

    data = ReportData(
        title=f"layerwise run: {Path(bundle.config['data']['source']).name}",
        summary=report_summary(bundle.config, summary),
        history=result.history,
        class_names=[],
        confusion=[],
        metrics={k: v for k, v in summary["metrics"].items() if isinstance(v, float | int)},
        baseline=baseline,
        verdict=summary["verdict"],
        examples=[],
        problems=[p.to_json() for p in prepared.problems],
        monitor=objective.monitor,
        higher_is_better=objective.higher_is_better,
        extra_sections=extra_sections,
    )
    write_report(run_dir / "report.html", data)


def curve_sections(run_dir: Path) -> list[tuple[str, str]]:
    """The learning-curve section when the run holds one (`train --curve`), else none."""
    from layerwise.curve import CURVE_FILE
    from layerwise.report.curve_sections import curve_section

    path = run_dir / CURVE_FILE
    return [curve_section(json.loads(path.read_text()))] if path.is_file() else []


def report_summary(config: dict, summary: dict) -> dict[str, str]:
    """The key/value table at the top of report.html, for any task."""
    data = config["data"]
    return {
        "task": config["task"],
        "modality": config["modality"],
        "model": f"{summary['model']} ({summary['parameters']:,} parameters)",
        "data": data["source"],
        "examples": f"{data['n_train']} train, {data['n_val']} validation, {data['n_skipped']} skipped",
        "epochs": f"{summary['epochs_run']} (best: {summary['best_epoch']}); {summary['stop_reason']}",
        "training time": f"{summary['train_seconds']} s on {summary['device']} ({summary['machine']})",
        "layerwise": config["layerwise_version"],
    }


def decode(
    logits: torch.Tensor, class_names: list[str], origins: list[str], k: int = 3, temperature: float = 1.0
) -> list[Prediction]:
    """Softmax of logits / temperature, then the top-k classes per row."""
    probabilities = torch.softmax(logits.float() / temperature, dim=1)
    top_p, top_i = probabilities.topk(min(k, len(class_names)), dim=1)
    return [
        Prediction(
            origin,
            class_names[int(i[0])],
            float(p[0]),
            [(class_names[int(j)], float(q)) for q, j in zip(p, i, strict=True)],
        )
        for origin, p, i in zip(origins, top_p, top_i, strict=True)
    ]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """accuracy, macro F1, top-3 accuracy (when > 3 classes), log loss; `n` examples."""
    # Imported here: scikit-learn's metrics pull in rich's progress bars, which predicting never needs.
    from sklearn.metrics import f1_score, log_loss

    predicted = logits.argmax(1).numpy()
    truth = labels.numpy()
    probabilities = torch.softmax(logits.float(), 1).numpy()
    metrics = {
        "accuracy": float((predicted == truth).mean()),
        "macro_f1": float(f1_score(truth, predicted, average="macro", labels=range(num_classes), zero_division=0)),
        "log_loss": float(log_loss(truth, probabilities, labels=range(num_classes))),
        "n": int(len(truth)),
    }
    if num_classes > 3:
        top3 = logits.topk(3, dim=1).indices.numpy()
        metrics["top3_accuracy"] = float((top3 == truth[:, None]).any(1).mean())
    return metrics


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=range(num_classes))
