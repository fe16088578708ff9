"""What a run keeps from its validation split so that shift can be measured later: RUN/shift.safetensors.

A sample of the validation embeddings (for the drift tests), the class-conditional Gaussians of the
OOD score with its calibrated threshold, and the confidence threshold of the label-free accuracy
estimate. Tensors go to safetensors; the few numbers go to its metadata. Reading it runs no code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from layerwise.errors import InputError
from layerwise.files import write_atomic
from layerwise.shift.estimate import AccuracyModel, label_free_features
from layerwise.shift.stats import Mahalanobis, atc_estimate, atc_threshold, fit_temperature, reliability

SHIFT_FILE = "shift.safetensors"
REFERENCE_SIZE = 1000  # embeddings kept for the two-sample tests; MMD's cost grows with the square
OOD_QUANTILE = 0.95  # an input scoring above 95% of validation inputs is flagged: 5% false alarms in-distribution
MIN_REFERENCE = 20  # fewer validation examples cannot calibrate a threshold


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling fitted on the validation split, with the calibration error before and after."""

    temperature: float
    ece_before: float
    ece_after: float
    reliability_before: dict
    reliability_after: dict

    def to_json(self) -> dict:
        return {"temperature": round(self.temperature, 6), "ece_before": self.ece_before, "ece_after": self.ece_after}


@dataclass(frozen=True)
class ShiftReference:
    embeddings: torch.Tensor  # (n <= REFERENCE_SIZE, D) validation embeddings
    ood: Mahalanobis
    ood_threshold: float  # Mahalanobis score above which an input is out-of-distribution
    atc_threshold: float  # calibrated confidence threshold of the accuracy estimate
    accuracy: float  # validation accuracy the thresholds were fitted at
    n_validation: int
    class_frequencies: torch.Tensor | None = None  # (K,) predicted-class frequencies on validation
    accuracy_model: AccuracyModel | None = None  # fitted on the corruption suite; None: ATC alone

    def features(self, probabilities: torch.Tensor, embeddings: torch.Tensor) -> list[float]:
        """The label-free statistics of a set of inputs: calibrated probabilities (N, K) and embeddings (N, D)."""
        return label_free_features(
            probabilities, self.ood.score(embeddings), self.atc_threshold, self.ood_threshold, self.class_frequencies
        )

    def estimate_accuracy(self, probabilities: torch.Tensor, embeddings: torch.Tensor) -> float:
        """Accuracy on these inputs without their labels: the learned estimate when fitted, else ATC."""
        if self.accuracy_model is None:
            return atc_estimate(probabilities.max(1).values, self.atc_threshold)
        return self.accuracy_model.predict(self.features(probabilities, embeddings))

    def to_bytes(self) -> bytes:
        """The safetensors file's bytes (written into the run atomically with the other run files)."""
        from safetensors.torch import save

        metadata = {
            "ood_threshold": self.ood_threshold, "atc_threshold": self.atc_threshold, "accuracy": self.accuracy,
            "n_validation": self.n_validation, "ood_quantile": OOD_QUANTILE,
            "accuracy_model": None if self.accuracy_model is None else self.accuracy_model.to_json(),
        }  # fmt: skip
        tensors = {
            "embeddings": self.embeddings, "class_means": self.ood.class_means, "precision": self.ood.precision,
            "class_frequencies": self.class_frequencies,
        }  # fmt: skip
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"shift": json.dumps(metadata)})

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> ShiftReference:
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = json.loads(file.metadata()["shift"])
                names = ("embeddings", "class_means", "precision", "class_frequencies")
                tensors = {name: file.get_tensor(name) for name in names}
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}: not a readable shift reference ({err})") from err
        return cls(
            embeddings=tensors["embeddings"],
            ood=Mahalanobis(tensors["class_means"], tensors["precision"]),
            ood_threshold=float(metadata["ood_threshold"]),
            atc_threshold=float(metadata["atc_threshold"]),
            accuracy=float(metadata["accuracy"]),
            n_validation=int(metadata["n_validation"]),
            class_frequencies=tensors["class_frequencies"],
            accuracy_model=None if metadata.get("accuracy_model") is None
            else AccuracyModel.from_json(metadata["accuracy_model"]),
        )  # fmt: skip


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """Fit the temperature on held-out logits (N, K) and measure ECE before and after."""
    correct = logits.argmax(1) == labels
    before = reliability(torch.softmax(logits.float(), 1).max(1).values, correct)
    temperature = fit_temperature(logits, labels)
    after = reliability(torch.softmax(logits.float() / temperature, 1).max(1).values, correct)
    return Calibration(temperature, before["ece"], after["ece"], before, after)


def fit_reference(
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    train_embeddings: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> ShiftReference:
    """Everything the shift tools need, from held-out embeddings (N, D), logits (N, K) and labels (N,).

    The class Gaussians of the OOD score are fitted on training embeddings when given, so that the
    threshold, set on the held-out ones, is not fitted on the same points it is measured on.
    """
    if len(embeddings) < MIN_REFERENCE:
        raise InputError(
            f"{len(embeddings)} held-out examples cannot calibrate shift detection; at least {MIN_REFERENCE} are needed"
        )
    if train_embeddings is None or train_labels is None:
        train_embeddings, train_labels = embeddings, labels
    ood = Mahalanobis.fit(train_embeddings, train_labels, logits.shape[1])
    confidences = torch.softmax(logits.float() / temperature, 1).max(1).values
    correct = logits.argmax(1) == labels
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(embeddings), generator=generator)[:REFERENCE_SIZE]
    return ShiftReference(
        embeddings=embeddings[sample].float().contiguous(),
        ood=ood,
        ood_threshold=float(torch.quantile(ood.score(embeddings).double(), OOD_QUANTILE)),
        atc_threshold=atc_threshold(confidences, correct),
        accuracy=float(correct.double().mean()),
        n_validation=len(embeddings),
        class_frequencies=torch.bincount(logits.argmax(1), minlength=logits.shape[1]).float() / len(logits),
    )
