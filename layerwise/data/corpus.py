"""A text corpus for language modelling: documents on disk, a held-out split, byte-level BPE, token files.

Documents come from a .txt file, a folder of .txt files (recursive) or a CSV `text` column. Text is
tokenised once into a memory-mapped token file, so memory stays flat as the corpus grows.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from layerwise.data.shards import refuse_pack
from layerwise.data.sources import Problem, _visible, manifest_rows, open_manifest
from layerwise.data.text import check_is_text
from layerwise.errors import DecodeError, InputError

END_OF_TEXT = "<|endoftext|>"  # separates documents in the token stream; id 0
MIN_VOCAB, MAX_VOCAB = 512, 8192
BYTES_PER_VOCAB_ENTRY = 2000  # vocabulary size grows with the corpus: ~1 entry per 2 kB of text
MANY_DOCUMENTS = 10  # from this many documents on, validation holds out whole documents
ENCODE_CHUNK_CHARS = 1 << 20  # documents are tokenised in pieces of about 1M characters


@dataclass(frozen=True)
class Document:
    origin: str  # a path or "data.csv line 7"
    path: Path | None = None
    text: str | None = None  # CSV rows carry their text inline

    def read(self) -> tuple[str, int]:
        """The text and the number of invalid UTF-8 bytes that were replaced (not fatal)."""
        if self.text is not None:
            return self.text, 0
        raw = self.path.read_bytes()
        if not raw:
            raise DecodeError("empty file (0 bytes)")
        check_is_text(raw)
        text = raw.decode("utf-8-sig", errors="replace")
        replaced = text.count("\ufffd") - raw.decode("utf-8-sig", errors="ignore").count("\ufffd")
        if not text.strip():
            raise DecodeError("empty text")
        return text, replaced


def looks_like_corpus(data: Path) -> bool:
    """A .txt file, a folder of .txt files with no class subfolders, or a CSV whose only column is `text`.

    A CSV with other columns besides `text` (e.g. a misnamed label column) is ambiguous: not claimed.
    """
    if data.is_file() and data.suffix.lower() == ".txt":
        return True
    if data.is_file() and data.suffix.lower() == ".csv":
        try:
            with open(data, encoding="utf-8-sig", newline="") as f:
                columns = {c.strip() for c in next(csv.reader(f), [])}
        except (OSError, UnicodeDecodeError):
            return False
        return columns == {"text"}
    if data.is_dir():
        entries = [p for p in data.iterdir() if not p.name.startswith(".")]
        return any(p.suffix.lower() == ".txt" for p in entries) and not any(p.is_dir() for p in entries)
    return False


def find_documents(data: Path) -> tuple[list[Document], list[Problem]]:
    """The documents under `data`, and the files that are not usable text (named, with the reason)."""
    if not data.exists():
        raise InputError(f"{data}: no such file or directory")
    refuse_pack(data)
    problems: list[Problem] = []
    if data.is_file() and data.suffix.lower() == ".csv":
        return _csv_documents(data)
    if data.is_file():
        if data.suffix.lower() != ".txt":
            raise InputError(f"{data}: expected a .txt file, a folder of .txt files or a CSV with a 'text' column")
        return [Document(str(data), path=data)], problems
    documents = []
    for path in sorted(p for p in data.rglob("*") if p.is_file() and _visible(p, data)):
        if path.suffix.lower() == ".txt":
            documents.append(Document(str(path), path=path))
        else:
            problems.append(Problem(str(path), f"not a .txt file ('{path.suffix}')"))
    if not documents:
        raise InputError(f"{data}: no .txt files found")
    return documents, problems


def _csv_documents(csv_path: Path) -> tuple[list[Document], list[Problem]]:
    reader, columns = open_manifest(csv_path)
    if "text" not in columns:
        raise InputError(f"{csv_path}: no 'text' column (columns found: {', '.join(columns) or 'none'})")
    documents, problems = [], []
    for row in manifest_rows(reader, csv_path):
        origin = f"{csv_path} line {reader.line_num}"
        value = next((v for k, v in row.items() if (k or "").strip() == "text"), "") or ""
        if value.strip():
            documents.append(Document(origin, text=value))
        else:
            problems.append(Problem(origin, "empty text"))
    return documents, problems


@dataclass(frozen=True)
class Piece:
    """A character range of a document (its training or validation part); read again when needed, never kept."""

    document: Document
    start: int = 0
    end: int | None = None

    def read(self) -> str:
        return self.document.read()[0][self.start : self.end]


@dataclass(frozen=True)
class Survey:
    """The usable documents, measured in one pass that holds one document in memory at a time."""

    documents: list[Document]
    cuts: list[int]  # where each document's last `val_fraction` begins (at a line break)
    n_bytes: list[tuple[int, int]]  # UTF-8 bytes of each document before and after its cut
    problems: list[Problem]
    replaced: int  # invalid UTF-8 bytes replaced, over all documents
    fingerprint: str  # of the contents, not of how DATA was named


def survey(documents: list[Document], val_fraction: float) -> Survey:
    usable, cuts, sizes, problems, replaced, digests = [], [], [], [], 0, []
    for document in documents:
        try:
            text, bad = document.read()
        except DecodeError as err:
            problems.append(Problem(document.origin, str(err)))
            continue
        except OSError as err:
            problems.append(Problem(document.origin, f"cannot read: {err.strerror}"))
            continue
        if bad:
            problems.append(Problem(document.origin, f"{bad} invalid UTF-8 byte(s) replaced (kept)"))
            replaced += bad
        cut = _cut_point(text, 1 - val_fraction)
        usable.append(document)
        cuts.append(cut)
        sizes.append((len(text[:cut].encode()), len(text[cut:].encode())))
        digests.append(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    fingerprint = hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]
    return Survey(usable, cuts, sizes, problems, replaced, fingerprint)


@dataclass(frozen=True)
class Split:
    """Training and validation text as pieces of documents."""

    train: list[Piece]
    val: list[Piece]
    rule: str  # how validation was held out, in words (stored in the run)
    n_train_bytes: int


def split_documents(found: Survey, val_fraction: float, seed: int) -> Split:
    """Whole documents held out when there are many; otherwise the last chunk of each document.

    Either way no validation text overlaps any training window.
    """
    documents = found.documents
    if len(documents) >= MANY_DOCUMENTS:
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        total = sum(before + after for before, after in found.n_bytes)
        val_ids, held = set(), 0
        for i in order:
            if held >= val_fraction * total:
                break
            val_ids.add(i)
            held += sum(found.n_bytes[i])
        train_ids = [i for i in range(len(documents)) if i not in val_ids]
        rule = f"whole documents, about {val_fraction:.0%} of the text, chosen with seed {seed}"
        return Split(
            [Piece(documents[i]) for i in train_ids],
            [Piece(documents[i]) for i in sorted(val_ids)],
            rule,
            sum(sum(found.n_bytes[i]) for i in train_ids),
        )
    train = [Piece(d, 0, cut) for d, cut in zip(documents, found.cuts, strict=True)]
    val = [Piece(d, cut, None) for d, cut in zip(documents, found.cuts, strict=True)]
    rule = f"the last {val_fraction:.0%} of each document (cut at a line break)"
    return Split(train, val, rule, sum(before for before, _ in found.n_bytes))


def read_pieces(pieces: list[Piece], max_chars: int | None = None) -> Iterator[str]:
    """The pieces' texts one at a time (at most `max_chars` characters in all)."""
    left = max_chars
    for piece in pieces:
        text = piece.read()
        if left is not None:
            text, left = text[:left], left - len(text)
        if text:
            yield text
        if left is not None and left <= 0:
            return


def _cut_point(text: str, fraction: float) -> int:
    """About `fraction` of the way into `text`, moved to a nearby line break that leaves text on both sides."""
    cut = int(len(text) * fraction)
    newline = text.find("\n", cut, min(cut + 2000, len(text) - 1))
    if newline < 0:
        newline = text.rfind("\n", max(cut - 2000, 1), cut)
    return newline + 1 if newline >= 0 else cut


def vocabulary_size(n_bytes: int) -> int:
    """A power of two between MIN_VOCAB and MAX_VOCAB, growing with the corpus."""
    wanted = max(n_bytes / BYTES_PER_VOCAB_ENTRY, 1)
    return int(min(MAX_VOCAB, max(MIN_VOCAB, 2 ** round(np.log2(wanted)))))


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): any UTF-8 text round-trips exactly through encode/decode."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet: each of the 256 bytes is shown as one printable character (as in GPT-2)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The raw bytes of every token id (b"" for the special tokens)."""
    table = _byte_of_char()
    vocab = tokenizer.get_vocab()
    result = [b""] * tokenizer.get_vocab_size()
    for token, i in vocab.items():
        if token != END_OF_TEXT:
            result[i] = bytes(table[c] for c in token)
    return result


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of about ENCODE_CHUNK_CHARS, cut after a line break (BPE never merges across one)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + ENCODE_CHUNK_CHARS)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        yield text[start:end]
        start = end


def write_tokens(tokenizer: Tokenizer, texts: Iterable[str], path: Path) -> np.memmap:
    """Tokenise `texts` into a uint16/uint32 file at `path` (documents separated by END_OF_TEXT); map it back."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    eot = tokenizer.token_to_id(END_OF_TEXT)
    n = 0
    with open(path, "wb") as f:
        for text in texts:
            for piece in _pieces(text):
                ids = np.asarray(tokenizer.encode(piece).ids, dtype=dtype)
                f.write(ids.tobytes())
                n += len(ids)
            f.write(np.asarray([eot], dtype=dtype).tobytes())
            n += 1
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def scratch_token_file(name: str) -> Path:
    """A private temporary file for a token stream; the caller maps it and may delete it once mapped."""
    fd, path = tempfile.mkstemp(prefix=f"layerwise-{name}-", suffix=".tokens")
    os.close(fd)
    return Path(path)
