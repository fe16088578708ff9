"""The modality front end contract, and choosing one from the data."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from layerwise.data.audio import AudioFrontEnd
from layerwise.data.image import ImageFrontEnd
from layerwise.data.pretrained_text import FRONT_END_NAME as PRETRAINED_TEXT
from layerwise.data.pretrained_text import PretrainedTextFrontEnd
from layerwise.data.sources import Example, Problem
from layerwise.data.text import TextFrontEnd


class FrontEnd(Protocol):
    """Raw files -> cached tensors -> model inputs. One implementation per modality."""

    modality: str

    @property
    def model_inputs(self) -> dict: ...  # what a backbone needs: in_channels, or vocab_size + max_len

    def to_json(self) -> dict: ...

    def decode_all(self, examples: list[Example]) -> tuple[torch.Tensor, list[int], list[Problem]]: ...

    # The signal before the cached representation (uint8 images, float waveforms, list[str] texts), so
    # that corruptions act on what a sensor would see; encode_raw(decode_raw(x)[0]) == decode_all(x)[0].
    def decode_raw(self, examples: list[Example]) -> tuple[Any, list[int], list[Problem]]: ...

    def encode_raw(self, raw: Any) -> torch.Tensor: ...

    def fit_statistics(self, train_inputs: torch.Tensor) -> None: ...

    def model_input(self, batch: torch.Tensor) -> torch.Tensor: ...

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def baseline_features(self, inputs: torch.Tensor) -> np.ndarray: ...

    def preview(self, item: torch.Tensor) -> bytes | str: ...


FRONT_ENDS = {"image": ImageFrontEnd, "audio": AudioFrontEnd, "text": TextFrontEnd}
# Front ends that come with a pretrained model rather than being fitted to the data; config.json names them.
NAMED_FRONT_ENDS = {PRETRAINED_TEXT: PretrainedTextFrontEnd}


def fit_frontend(modality: str, train_examples: list[Example]) -> FrontEnd:
    """Choose preprocessing (size, clip length, tokenizer) from the training examples."""
    return FRONT_ENDS[modality].fit(train_examples)


def frontend_from_json(config: dict) -> FrontEnd:
    named = NAMED_FRONT_ENDS.get(config.get("front_end", ""))
    return (named or FRONT_ENDS[config["modality"]]).from_json(config)
