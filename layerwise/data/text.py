"""Text front end: UTF-8 text -> WordPiece tokens (tokenizer trained on the training texts) -> ids."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from layerwise.data.sources import Example, Problem
from layerwise.errors import DecodeError
from layerwise.runtime import host_to

PAD, UNK, CLS, MASK = "[PAD]", "[UNK]", "[CLS]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, MASK]  # ids 0..3 in this order
PAD_ID, UNK_ID, CLS_ID, MASK_ID = 0, 1, 2, 3
MAX_VOCAB = 8000
MIN_LEN, MAX_LEN = 16, 128  # sequence length chosen from the data within these bounds
TOKEN_MASK_PROBABILITY = 0.1  # augmentation: hide 10% of tokens behind [MASK]


MAX_CONTROL_FRACTION = 0.1  # above this share of NUL/control bytes a file named .txt is binary
TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")  # control bytes that real text files do contain


def check_is_text(raw: bytes) -> None:
    """Refuse binary data named .txt: a file that is mostly NUL or control bytes is not text."""
    sample = raw[: 1 << 20]
    controls = sum(1 for byte in sample if byte < 0x20 and byte not in TEXT_CONTROLS)
    if controls > MAX_CONTROL_FRACTION * len(sample):
        raise DecodeError(f"not text: {controls / len(sample):.0%} of its bytes are NUL or control characters")
    # Compressed or random data has few control bytes but is mostly invalid UTF-8.
    invalid = sample.decode("utf-8", errors="replace").count("\ufffd") - sample.decode("utf-8", "ignore").count(
        "\ufffd"
    )
    if invalid > MAX_CONTROL_FRACTION * len(sample):
        raise DecodeError(f"not text: {invalid / len(sample):.0%} of its bytes are not valid UTF-8")


def read_text(example: Example) -> str:
    """The example's text: inline, or the file decoded as UTF-8 (bad bytes replaced, not fatal)."""
    if example.text is not None:
        text = example.text
    else:
        raw = example.data if example.data is not None else example.path.read_bytes()
        if not raw:
            raise DecodeError("empty file (0 bytes)")
        check_is_text(raw)
        text = raw.decode("utf-8-sig", errors="replace")  # a byte-order mark is not text
    if not text.strip():
        raise DecodeError("empty text")
    return text


def train_tokenizer(texts: list[str], vocab_size: int = MAX_VOCAB) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, CLS_ID)])
    return tokenizer


@dataclass(frozen=True)
class TextPreprocessing:
    max_len: int
    tokenizer_json: str  # the whole trained tokenizer, so a run directory is self-contained

    def to_json(self) -> dict:
        return {"modality": "text", "max_len": self.max_len, "tokenizer": json.loads(self.tokenizer_json)}


@dataclass(frozen=True)
class TokenRoles:
    """The ids of a text front end that are not words, which explanations keep as they are and never score.

    Each tokenizer numbers them its own way (ours 0-3; a BERT vocabulary puts [CLS] at 101), so explanations
    ask the run's front end instead of assuming one numbering.
    """

    pad: int
    cls: int
    mask: int
    unk: int
    sep: int | None = None  # pretrained encoders close each text with [SEP]

    def words(self, ids: torch.Tensor) -> torch.Tensor:
        """True at the positions that hold a piece of the text (not [PAD], [CLS] or [SEP])."""
        frame = (ids == self.pad) | (ids == self.cls)
        return ~(frame | (ids == self.sep)) if self.sep is not None else ~frame

    def special(self) -> set[int]:
        return {self.pad, self.cls, self.mask, self.unk} | ({self.sep} if self.sep is not None else set())


OUR_TOKEN_ROLES = TokenRoles(pad=PAD_ID, cls=CLS_ID, mask=MASK_ID, unk=UNK_ID)


class TokenIds:
    """Reading and tokenising texts, for a front end with a padding, truncating `tokenizer` and `prep.max_len`."""

    def decode_all(self, examples: list[Example]) -> tuple[torch.Tensor, list[int], list[Problem]]:
        """Decode every example; returns int64 token ids (N_ok, max_len), kept indices, problems."""
        texts, kept, problems = self.decode_raw(examples)
        return self.encode_raw(texts), kept, problems

    def decode_raw(self, examples: list[Example]) -> tuple[list[str], list[int], list[Problem]]:
        """The texts before tokenisation, the kept indices, and problems."""
        texts, kept, problems = [], [], []
        for i, example in enumerate(examples):
            try:
                texts.append(read_text(example))
                kept.append(i)
            except DecodeError as err:
                problems.append(Problem(example.origin, str(err)))
            except OSError as err:
                problems.append(Problem(example.origin, f"cannot read: {err.strerror}"))
        return texts, kept, problems

    def encode_raw(self, raw: list[str]) -> torch.Tensor:
        """Texts -> int64 token ids (N, max_len), as cached."""
        ids = [e.ids for e in self.tokenizer.encode_batch(raw)]
        return torch.tensor(ids, dtype=torch.int64) if ids else torch.zeros((0, self.prep.max_len), dtype=torch.int64)


class TextFrontEnd(TokenIds):
    """Texts -> int64 token ids (N, max_len), [CLS] first, [PAD] after the end."""

    modality = "text"
    token_roles = OUR_TOKEN_ROLES

    def __init__(self, prep: TextPreprocessing) -> None:
        self.prep = prep
        self.tokenizer = Tokenizer.from_str(prep.tokenizer_json)
        self.tokenizer.enable_truncation(prep.max_len)
        self.tokenizer.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=prep.max_len)

    @classmethod
    def fit(cls, examples: list[Example]) -> TextFrontEnd:
        texts = []
        for example in examples:
            try:
                texts.append(read_text(example))
            except (DecodeError, OSError):
                continue  # reported by decode_all() later, by name
        tokenizer = train_tokenizer(texts)
        lengths = [len(e.ids) for e in tokenizer.encode_batch(texts[:2000])] or [MIN_LEN]
        max_len = int(min(MAX_LEN, max(MIN_LEN, np.percentile(lengths, 95))))
        return cls(TextPreprocessing(max_len=max_len, tokenizer_json=tokenizer.to_str()))

    @classmethod
    def from_json(cls, config: dict) -> TextFrontEnd:
        return cls(TextPreprocessing(max_len=config["max_len"], tokenizer_json=json.dumps(config["tokenizer"])))

    def to_json(self) -> dict:
        return self.prep.to_json()

    @property
    def model_inputs(self) -> dict:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "max_len": self.prep.max_len}

    def fit_statistics(self, train_inputs: torch.Tensor) -> None:
        """Nothing to fit: the tokenizer was trained in fit()."""

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Hide a random 10% of the real tokens behind [MASK]."""
        # The CPU generator's draws, wherever the batch is (a batch held on a GPU gets the same ones).
        drawn = host_to(torch.rand(batch.shape, generator=generator), batch.device)
        hide = (drawn < TOKEN_MASK_PROBABILITY) & (batch > MASK_ID)
        return torch.where(hide, torch.full_like(batch, MASK_ID), batch)

    def baseline_features(self, inputs: torch.Tensor) -> sparse.csr_matrix:
        """Bag of token ids as a sparse count matrix (N, vocab); the baseline adds TF-IDF."""
        ids = inputs.numpy()
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        flat = ids.reshape(-1)
        keep = flat > MASK_ID
        counts = sparse.csr_matrix(
            (np.ones(keep.sum(), dtype=np.float32), (rows[keep], flat[keep])),
            shape=(len(ids), self.tokenizer.get_vocab_size()),
        )
        counts.sum_duplicates()
        return counts

    def preview(self, item: torch.Tensor) -> str:
        return self.tokenizer.decode(item.tolist())
