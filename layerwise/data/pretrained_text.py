"""Text front end of a pretrained encoder: the encoder's own WordPiece tokenizer, not one trained on the data.

A pretrained network's embedding rows mean the tokens of the vocabulary it was trained with, so the
tokenizer comes with the weights (for all-MiniLM-L6-v2: BERT's uncased vocabulary, 30,522 tokens) and
only the sequence length is chosen from the data. Inputs are `[CLS] text [SEP]`, as in pretraining.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from tokenizers import Tokenizer, processors

from layerwise.data.sources import Example
from layerwise.data.text import TOKEN_MASK_PROBABILITY, TokenIds, TokenRoles, read_text
from layerwise.errors import DecodeError
from layerwise.runtime import host_to

FRONT_END_NAME = "pretrained_wordpiece"  # config.json "preprocessing"."front_end": how frontend_from_json finds us
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
MIN_LEN = 16
MAX_LEN = 256  # the encoder has 512 positions; sentence-transformers reads at most 256 tokens of a text
LENGTH_PERCENTILE = 95  # max_len covers this share of the training texts whole
LENGTH_SAMPLE = 2000  # texts tokenised to choose max_len


@dataclass(frozen=True)
class PretrainedTextPreprocessing:
    max_len: int
    tokenizer_json: str  # the encoder's whole tokenizer, so the run directory never needs the package again
    source: str  # where the tokenizer came from (the Python package), for people reading config.json

    def to_json(self) -> dict:
        return {
            "modality": "text", "front_end": FRONT_END_NAME, "source": self.source, "max_len": self.max_len,
            "tokenizer": json.loads(self.tokenizer_json),
        }  # fmt: skip


class PretrainedTextFrontEnd(TokenIds):
    """Texts -> int64 token ids (N, max_len) in the encoder's vocabulary: [CLS] text [SEP], then [PAD]."""

    modality = "text"

    def __init__(self, prep: PretrainedTextPreprocessing) -> None:
        self.prep = prep
        self.tokenizer = Tokenizer.from_str(prep.tokenizer_json)
        ids = {token: self.tokenizer.token_to_id(token) for token in (PAD, UNK, CLS, SEP, MASK)}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer from {prep.source} has no {', '.join(missing)} token")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids.values()
        self.special_ids = torch.tensor(sorted(ids.values()))
        self.token_roles = TokenRoles(pad=self.pad_id, cls=self.cls_id, mask=self.mask_id, unk=self.unk_id,
                                      sep=self.sep_id)  # fmt: skip
        # Set here rather than trusted from the file: the package's file pads and truncates to 128.
        self.tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", special_tokens=[(CLS, self.cls_id), (SEP, self.sep_id)]
        )
        self.tokenizer.enable_truncation(prep.max_len)  # counts [CLS] and [SEP]: [SEP] always ends the sequence
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=prep.max_len)

    @classmethod
    def fit(cls, examples: list[Example], tokenizer_file: Path, source: str) -> PretrainedTextFrontEnd:
        """The packaged tokenizer, and max_len from the training texts (95th percentile, within 16..256)."""
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        texts = []
        for example in examples[:LENGTH_SAMPLE]:
            try:
                texts.append(read_text(example))
            except (DecodeError, OSError):
                continue  # reported by decode_all() later, by name
        lengths = [len(e.ids) + 2 for e in tokenizer.encode_batch(texts, add_special_tokens=False)] or [MIN_LEN]
        max_len = int(min(MAX_LEN, max(MIN_LEN, np.percentile(lengths, LENGTH_PERCENTILE))))
        return cls(PretrainedTextPreprocessing(max_len, tokenizer.to_str(), source))

    @classmethod
    def from_json(cls, config: dict) -> PretrainedTextFrontEnd:
        return cls(PretrainedTextPreprocessing(config["max_len"], json.dumps(config["tokenizer"]), config["source"]))

    def to_json(self) -> dict:
        return self.prep.to_json()

    @property
    def model_inputs(self) -> dict:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "max_len": self.prep.max_len}

    def fit_statistics(self, train_inputs: torch.Tensor) -> None:
        """Nothing to fit: the tokenizer came with the weights."""

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, max_len) -> (B, T) with T the batch's longest text: trailing [PAD] columns cost attention and
        feed-forward time (most texts are far shorter than max_len) and change no output at a real token."""
        longest = int((batch != self.pad_id).sum(1).max()) if len(batch) else batch.shape[1]
        return batch[:, : max(longest, 1)]

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Hide a random 10% of the text's tokens behind [MASK] (never [CLS], [SEP] or [PAD])."""
        real = ~torch.isin(batch, host_to(self.special_ids, batch.device))
        # The CPU generator's draws, wherever the batch is (a batch held on a GPU gets the same ones).
        drawn = host_to(torch.rand(batch.shape, generator=generator), batch.device)
        hide = (drawn < TOKEN_MASK_PROBABILITY) & real
        return torch.where(hide, torch.full_like(batch, self.mask_id), batch)

    def baseline_features(self, inputs: torch.Tensor) -> sparse.csr_matrix:
        """Bag of token ids as a sparse count matrix (N, vocab), special tokens left out; the baseline adds TF-IDF."""
        ids = inputs.numpy()
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        flat = ids.reshape(-1)
        keep = ~np.isin(flat, self.special_ids.numpy())
        counts = sparse.csr_matrix(
            (np.ones(keep.sum(), dtype=np.float32), (rows[keep], flat[keep])),
            shape=(len(ids), self.tokenizer.get_vocab_size()),
        )
        counts.sum_duplicates()
        return counts

    def preview(self, item: torch.Tensor) -> str:
        return self.tokenizer.decode(item.tolist(), skip_special_tokens=True)
