"""Classification: metrics over logits, and decoding logits into labelled predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, log_loss


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "top_k": [{"label": label, "confidence": round(p, 6)} for label, p in self.top_k],
        }


def decode(logits: torch.Tensor, class_names: list[str], origins: list[str], k: int = 3) -> list[Prediction]:
    """Softmax, then the top-k classes per row."""
    probabilities = torch.softmax(logits.float(), dim=1)
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
    return confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=range(num_classes))
