"""The honest classical baseline fitted beside every deep model, on the same split.

Logistic regression (scikit-learn) on features the front end gives without learning: downsampled
pixels, log-mel band statistics, or TF-IDF of the tokens. If it matches the deep model, the user
should know that deep learning was not worth it for this data.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_TRAIN_EXAMPLES = 20_000  # keeps the baseline to seconds; said in its description when it applies
DESCRIPTIONS = {
    "image": "logistic regression on 14x14 downsampled pixels",
    "audio": "logistic regression on log-mel band means and deviations",
    "text": "logistic regression on TF-IDF of the tokens",
}


def fit_baseline(modality: str, train_x, train_y: np.ndarray, val_x, val_y: np.ndarray, seed: int = 0) -> dict:
    """Fit on train, score on validation. Returns {"model", "accuracy", "seconds", ...}."""
    started = time.perf_counter()
    description = DESCRIPTIONS[modality]
    if train_x.shape[0] > MAX_TRAIN_EXAMPLES:
        pick = np.random.default_rng(seed).choice(train_x.shape[0], MAX_TRAIN_EXAMPLES, replace=False)
        train_x, train_y = train_x[pick], train_y[pick]
        description += f" (fitted on a random {MAX_TRAIN_EXAMPLES:,} training examples)"
    scaler = TfidfTransformer() if modality == "text" else StandardScaler()
    classifier = make_pipeline(scaler, LogisticRegression(C=1.0, max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(train_x, train_y)
    predicted = classifier.predict(val_x)
    return {
        "model": description,
        "accuracy": float((predicted == val_y).mean()),
        "n": int(len(val_y)),
        "seconds": round(time.perf_counter() - started, 2),
    }


def verdict(
    deep: float, classical: float | None, metric: str = "", show=lambda v: f"{v:.1%}", approach: str = "from scratch"
) -> str:
    """One plain sentence on which approach won here and by how much, for a score in [0, 1] where higher is better.

    `metric` names the score in the sentence (e.g. "mAP@0.5 "); `show` formats a value; `approach` says how the
    deep model started (see `api.approach`).
    """
    model = f"deep model ({approach})"
    if classical is None:
        return "No classical baseline could be fitted."
    gap = (deep - classical) * 100
    if gap <= 0:
        return (
            f"The classical baseline wins: {metric}{show(classical)} vs {show(deep)} for the {model}. "
            "Deep learning is not worth it on this data as it stands."
        )
    if gap < 1:
        return (
            f"The {model} is only {gap:.1f} {metric}points ahead of the classical baseline; the simpler model may do."
        )
    return f"The {model} beats the classical baseline by {gap:.1f} {metric}points ({show(deep)} vs {show(classical)})."
