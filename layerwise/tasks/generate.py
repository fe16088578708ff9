"""Generation: a GPT-style language model of the user's own text, measured in bits per byte.

Targets are the next token at every position of random windows of a memory-mapped token stream;
the head is the tied embedding; the loss is shifted cross-entropy; the monitor is bits per byte
(tokenizer-independent, lower is better); the decoder samples with a KV cache; the honest baseline
is an interpolated Kneser-Ney n-gram model over bytes, scored on the same validation text.
"""

from __future__ import annotations

import codecs
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from layerwise.data.corpus import (
    END_OF_TEXT,
    Piece,
    find_documents,
    looks_like_corpus,
    read_pieces,
    scratch_token_file,
    split_documents,
    survey,
    token_bytes,
    train_bpe,
    vocabulary_size,
    write_tokens,
)
from layerwise.data.shards import is_shard_folder, read_pack
from layerwise.data.sources import Problem
from layerwise.data.windows import RandomWindows, SequentialWindows
from layerwise.errors import InputError
from layerwise.models.registry import model_entry
from layerwise.runtime import autocast_for, model_device, to_device
from layerwise.tasks.base import FitOptions, PackOptions, Prepared, RunMismatch, result_rows

NGRAM_ORDER = 6  # the byte n-gram baseline's order (6 scored best on held-out Austen among 4..8)
MAX_BASELINE_BYTES = 32 << 20  # the n-gram model is fitted on at most the first 32 MB of training text
MAX_TOKENIZER_CHARS = 64 << 20  # BPE is trained on at most the first 64M characters of training text
SAMPLE_PROMPTS, SAMPLE_PROMPT_CHARS, SAMPLE_TOKENS = 3, 60, 48  # per-epoch samples in history.jsonl
DEFAULT_CONTEXT, SMALL_CONTEXT, MIN_CONTEXT = 256, 128, 16
# Tokens per training step (batch size x context length). On 2 CPU cores small batches learn fastest
# in a fixed time: 2 minutes on Austen gave 1.77 / 1.84 / 1.93 / 2.31 bits per byte at 1k / 2k / 4k / 8k
# tokens per step (benchmarks/generate.py; 2k tokens of batch 2 did worse again).
BATCH_TOKENS = 1024
EVAL_BATCH = 16
EPOCH_EVAL_WINDOWS = 96  # per-epoch validation reads this many windows spread over the split; final metrics all


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    new_tokens: int
    seconds: float

    def to_json(self) -> dict:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        return {
            "prompt": self.prompt,
            "text": self.text,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(rate, 2),
        }


class GenerateTask:
    """A fitted generation task: the byte-level BPE tokenizer; per-epoch sample prompts while training."""

    name = "generate"
    monitor = "bits_per_byte"
    higher_is_better = False
    commands = frozenset({"generate", "evaluate"})
    modality = "text"

    def __init__(self, tokenizer: Tokenizer, sample_prompts: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self._bytes_of = token_bytes(tokenizer)  # token id -> its raw bytes
        self.token_bytes = np.array([len(b) for b in self._bytes_of], dtype=np.int64)
        self.sample_prompts = sample_prompts or []

    @classmethod
    def claims(cls, data: Path) -> bool:
        return looks_like_corpus(data)

    def to_json(self) -> dict:
        return {
            "modality": self.modality,
            "preprocessing": {
                "modality": self.modality,
                "tokenizer_kind": "byte-level BPE",
                "vocab_size": self.tokenizer.get_vocab_size(),
                "tokenizer": json.loads(self.tokenizer.to_str()),
            },
        }

    @classmethod
    def from_config(cls, config: dict) -> GenerateTask:
        return cls(Tokenizer.from_str(json.dumps(config["preprocessing"]["tokenizer"])))

    def run_files(self) -> dict[str, str]:
        """Extra files of the run directory: the tokenizer on its own, for other tools."""
        return {"tokenizer.json": self.tokenizer.to_str()}

    # ------------------------------------------------------------------ objective

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = model(inputs).float()  # (B, T, vocab)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> dict:
        metrics = self.language_metrics(model, batches)
        if self.sample_prompts:
            metrics["samples"] = [
                self.sample(model, p, SAMPLE_TOKENS, seed=i) for i, p in enumerate(self.sample_prompts)
            ]
        return metrics

    @torch.no_grad()
    def language_metrics(self, model: nn.Module, batches) -> dict:
        """loss (nats per token), perplexity, bits per byte, and the counts they are over."""
        device = model_device(model)
        was_training = model.training
        model.eval()
        total_nats, n_tokens, n_bytes = 0.0, 0, 0
        for x, y in batches.epoch(0):
            with autocast_for(device, True):
                logits = model(to_device(x, device)).float()
            y = to_device(y, device)
            nats = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
            real = y.flatten().cpu().numpy()
            real = real[real >= 0]
            total_nats += float(nats)
            n_tokens += len(real)
            n_bytes += int(self.token_bytes[real].sum())
        model.train(was_training)
        loss = total_nats / max(n_tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
            "n_tokens": n_tokens,
            "n_bytes": n_bytes,
        }

    # ------------------------------------------------------------------ training data

    @classmethod
    def prepare(cls, data: Path, options: FitOptions, saved: dict | None = None, donor=None, log=print) -> Prepared:
        """Read the documents, hold out validation text, train (or restore) the tokenizer, write token files;
        or, for a folder `layerwise pack --task generate` wrote, map its token files."""
        if options.modality not in (None, "text"):
            raise InputError(f"--modality {options.modality}: generation learns from text")
        if is_shard_folder(data):
            corpus = packed_corpus(data, options, saved, donor, log)
        else:
            corpus = raw_corpus(data, options, saved, donor, log)
        train_tokens, val_tokens, tokenizer = corpus.train_tokens, corpus.val_tokens, corpus.tokenizer
        model_name = options.model or default_model(corpus.summary["n_train_bytes"], options.time_budget)
        entry = model_entry(model_name)
        if "generate" not in entry.tasks:
            raise InputError(f"--model {model_name} is a {'/'.join(entry.tasks)} model; generation needs a gpt_* model")
        context = saved["model"]["config"]["context_len"] if saved else _context_len(len(train_tokens))
        if len(train_tokens) < context + 2:
            raise InputError(
                f"{data}: too little text to train on: {len(train_tokens)} training tokens cannot fill one window "
                f"of {context + 1} tokens; give more text"
            )
        if len(val_tokens) < 2:
            raise InputError(f"{data}: too little text to hold any out for validation")
        batch = options.batch_size or max(4, BATCH_TOKENS // context)
        data_summary = {"source": str(data), "n_train": len(train_tokens), "n_val": len(val_tokens)} | corpus.summary
        if saved and saved["data"].get("fingerprint") != data_summary["fingerprint"]:
            raise RunMismatch(f"--resume: {data} no longer matches the run (its text differs); use the same data")
        if saved and [saved["data"].get(k) for k in ("n_train", "n_val")] != [len(train_tokens), len(val_tokens)]:
            raise RunMismatch(f"--resume: {data} splits the text differently from the run; use the same data and split")
        prompts = [_prompt_from(text) for text in islice(corpus.val_text(), SAMPLE_PROMPTS) if text.strip()]
        return Prepared(
            task=cls(tokenizer, prompts),
            train_batches=RandomWindows(train_tokens, context, batch, seed=options.seed),
            val_batches=SequentialWindows(val_tokens, context, EVAL_BATCH, max_windows=EPOCH_EVAL_WINDOWS),
            model_name=model_name,
            model_config={"vocab_size": tokenizer.get_vocab_size(), "context_len": context},
            data_summary=data_summary,
            problems=corpus.problems,
            batch_size=batch,
            extras={
                "split": f"validation: {corpus.summary['split_rule']}",
                "train_text": corpus.train_text,
                "val_text": corpus.val_text,
                "all_val_batches": SequentialWindows(val_tokens, context, EVAL_BATCH),
            },  # fmt: skip
        )

    @classmethod
    def pack_into(cls, data: Path, staging: Path, options: PackOptions, log=print) -> dict:
        """`layerwise pack` for text generation (see `pack_corpus`); one token file per split, whatever shard_size."""
        if options.modality not in (None, "text"):
            raise InputError(f"--modality {options.modality}: generation learns from text")
        return pack_corpus(data, staging, options.val_fraction, options.seed, log)

    # ------------------------------------------------------------------ after training

    def final_metrics(self, network: nn.Module, prepared: Prepared) -> dict:
        metrics = self.language_metrics(network, prepared.extras["all_val_batches"])
        prepared.extras["samples"] = [
            {"prompt": prompt, "continuation": self.sample(network, prompt, 80, seed=i)}
            for i, prompt in enumerate(self.sample_prompts)
        ]
        return metrics

    def baseline(self, prepared: Prepared, seed: int) -> dict:
        from layerwise.tasks.ngram import KneserNey

        started = time.perf_counter()
        # At most MAX_BASELINE_BYTES of training text is held, one document at a time until then.
        train_bytes = "\n".join(prepared.extras["train_text"](MAX_BASELINE_BYTES)).encode()
        train_bytes = train_bytes[:MAX_BASELINE_BYTES]
        model = KneserNey.fit(train_bytes, order=NGRAM_ORDER)
        bits, n_bytes = 0.0, 0
        for text in prepared.extras["val_text"]():
            data = text.encode()
            if data:
                bits += float(-model.log2_probs(data).sum())
                n_bytes += len(data)
        description = model.description
        if len(train_bytes) == MAX_BASELINE_BYTES:
            description += f" (fitted on the first {MAX_BASELINE_BYTES >> 20} MB of training text)"
        return {
            "model": description,
            "bits_per_byte": bits / max(n_bytes, 1),
            "n_bytes": n_bytes,
            "seconds": round(time.perf_counter() - started, 2),
        }

    def verdict(self, metrics: dict, baseline: dict, approach: str = "from scratch") -> str:
        deep, classical = metrics["bits_per_byte"], baseline.get("bits_per_byte")
        if classical is None:
            return "No classical baseline could be fitted."
        change = (classical - deep) / classical
        if change <= 0:
            return (
                f"The n-gram baseline wins: {classical:.3f} vs {deep:.3f} bits per byte for the network ({approach}). "
                "Deep learning is not worth it on this text as it stands (more text or training time may change that)."
            )
        if change < 0.01:
            return (
                f"The network ({approach}) is only {change:.1%} better than the n-gram baseline; "
                "the simpler model may do."
            )
        return (
            f"The network ({approach}) beats the n-gram baseline: {deep:.3f} vs {classical:.3f} bits per byte "
            f"({change:.0%} fewer bits to encode the held-out text)."
        )

    def summary_rows(self, summary: dict) -> list[tuple[str, str]]:
        return result_rows(summary, "bits_per_byte", lambda v: f"{v:.3f}")

    def write_report(self, run_dir: Path, bundle, summary: dict, result, prepared: Prepared, log=print) -> None:
        from layerwise.report.sections import samples_html, tokenizer_html
        from layerwise.tasks.classify import write_task_report

        sections = [
            ("Samples", samples_html(prepared.extras.get("samples", []))),
            ("Tokenizer", tokenizer_html(self.tokenizer_stats(prepared))),
        ]
        write_task_report(run_dir, bundle, summary, result, prepared, self, summary["baseline"], sections)

    def tokenizer_stats(self, prepared: Prepared) -> dict:
        data = prepared.data_summary
        return {
            "kind": "byte-level BPE (round-trips any UTF-8 text exactly)",
            "vocabulary size": self.tokenizer.get_vocab_size(),
            "training tokens": data["n_train"],
            "training bytes": data["n_train_bytes"],
            "bytes per token": round(data["n_train_bytes"] / max(data["n_train"], 1), 2),
            "documents": data["n_documents"],
            "invalid UTF-8 bytes replaced": data["n_replaced_bytes"],
        }

    # ------------------------------------------------------------------ inference

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def sample(self, network: nn.Module, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
        return self.generate(network, prompt, max_new_tokens, temperature=0.8, top_k=50, seed=seed).text

    def generate(
        self,
        network: nn.Module,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue `prompt`; `on_text` receives the new text as it is produced (whole UTF-8 characters)."""
        from layerwise.models.gpt import generate

        if not prompt:
            raise InputError("--prompt: empty; give some text to continue")
        if temperature < 0:
            raise InputError(f"--temperature must be 0 (greedy) or positive, not {temperature}")
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
        ids = self.encode(prompt)
        if len(ids) > network.context_len and log is not None:
            log(f"note: the prompt has {len(ids)} tokens; only its last {network.context_len} fit the context")
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []

        def emit(token_id: int) -> None:
            text = decoder.decode(self._bytes_of[token_id])
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)

        started = time.perf_counter()
        new_ids = generate(
            network, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
            on_token=emit,
        )  # fmt: skip
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
        return Generation(prompt, "".join(pieces), len(new_ids), time.perf_counter() - started)

    def example_inputs(self, data: Path, n: int, network: nn.Module) -> torch.Tensor:
        """Up to `n` windows of token ids (n, context) from the start of `data`'s text, for export's parity check."""
        found = survey(find_documents(Path(data))[0], val_fraction=0.0)
        context = network.context_len
        ids: list[int] = []
        for text in read_pieces([Piece(d) for d in found.documents]):
            ids += self.encode(text)
            if len(ids) >= n * context:
                break
        if len(ids) < 2:
            raise InputError(f"{data}: too little text to check the export with")
        windows = max(1, min(n, len(ids) // context))
        width = min(context, len(ids))
        return torch.tensor(ids[: windows * width], dtype=torch.int64).view(windows, width)

    def max_sequence_length(self, network: nn.Module) -> int:
        return int(network.context_len)

    def output_meaning(self) -> str:
        return (
            "logits (batch, sequence, vocabulary) for the next token at every position; to generate, take "
            "softmax(logits[:, -1] / temperature), sample a token id, append it to the input and run again"
        )

    def evaluate_data(self, network: nn.Module, data: str | Path) -> tuple[dict, list[Problem]]:
        """loss, perplexity and bits per byte of the model on all the text in `data`."""
        documents, problems = find_documents(Path(data))
        found = survey(documents, val_fraction=0.0)
        problems += found.problems
        if not found.documents:
            raise InputError(f"{data}: no usable text to evaluate")
        tokens = _mapped_tokens(self.tokenizer, read_pieces([Piece(d) for d in found.documents]), "eval")
        if len(tokens) < 2:
            raise InputError(f"{data}: too little text to evaluate")
        metrics = self.language_metrics(network, SequentialWindows(tokens, network.context_len, EVAL_BATCH))
        return metrics, problems


def default_model(n_train_bytes: int, time_budget: float | None) -> str:
    """gpt_tiny unless there is both the text and the time for more (sizes measured on 2 CPU cores).

    A bigger model only pays off when it can see enough tokens: gpt_small for 20 MB of text, or for
    5 MB with an hour or more of training (or no time budget at all).
    """
    long_run = time_budget is None or time_budget >= 3600
    if n_train_bytes > 20_000_000 or (n_train_bytes > 5_000_000 and long_run):
        return "gpt_small"
    return "gpt_tiny"


@dataclass(frozen=True)
class Corpus:
    """Training and validation text as the task trains on it: token streams (memory-mapped files, so a corpus
    larger than memory is read as it is used), the tokenizer, and the texts the baseline and prompts read."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    summary: dict  # data_summary entries beyond the token counts
    problems: list[Problem]
    train_text: Callable[[int | None], Iterable[str]]  # at most that many characters of training text
    val_text: Callable[[], Iterable[str]]  # the validation texts, one at a time


def raw_corpus(
    data: Path, options: FitOptions, saved: dict | None, donor, log=print, token_files: dict[str, Path] | None = None
) -> Corpus:
    """Documents under `data`: split, tokenizer trained (or restored, or the --init run's), tokenised to scratch
    files, or into `token_files` ({"train": path, "val": path}: a pack's, kept)."""
    documents, problems = find_documents(data)
    found = survey(documents, options.val_fraction)
    problems += found.problems
    if not found.documents:
        reasons = "; ".join(f"{p.origin}: {p.reason}" for p in problems[:3])
        raise InputError(f"{data}: no usable text ({reasons})")
    split = split_documents(found, options.val_fraction, options.seed)
    n_bytes = split.n_train_bytes
    if saved:
        tokenizer = Tokenizer.from_str(json.dumps(saved["preprocessing"]["tokenizer"]))
    elif donor is not None and isinstance(donor.task, GenerateTask):
        tokenizer = donor.task.tokenizer  # the donor's embedding rows mean its tokens
        log("tokenizer taken from the --init run")
    else:
        tokenizer = train_bpe(read_pieces(split.train, MAX_TOKENIZER_CHARS), vocabulary_size(n_bytes))
    n_documents = len(found.documents)
    log(f"{data}: {n_documents} document(s), {n_bytes:,} training bytes, vocabulary {tokenizer.get_vocab_size()}")
    summary = {
        "units": "tokens", "n_documents": n_documents, "n_train_bytes": n_bytes, "n_skipped": len(problems),
        "n_replaced_bytes": found.replaced, "val_fraction": options.val_fraction, "split_rule": split.rule,
        "fingerprint": found.fingerprint,
    }  # fmt: skip

    def tokens(name: str, texts: Iterable[str]) -> np.ndarray:
        if token_files is not None:
            return write_tokens(tokenizer, texts, token_files[name])
        return _mapped_tokens(tokenizer, texts, name)

    return Corpus(
        tokenizer, tokens("train", read_pieces(split.train)), tokens("val", read_pieces(split.val)), summary,
        problems, lambda max_chars=None: read_pieces(split.train, max_chars), lambda: read_pieces(split.val),
    )  # fmt: skip


# The files of a packed corpus (besides index.json): token streams, the baseline's training text, validation text.
PACKED_TOKENS = {"train": "train.tokens", "val": "val.tokens"}
PACKED_BASELINE_TEXT, PACKED_VAL_TEXT = "baseline-train.txt", "val-text.jsonl"


def pack_corpus(data: Path, staging: Path, val_fraction: float, seed: int, log=print) -> dict:
    """`layerwise pack DATA --task generate`: the split and tokenizer `train` would make, the token streams written
    once (a corpus is tokenised once, not at every run), the n-gram baseline's training text (its first
    MAX_BASELINE_BYTES) and the validation texts (JSON lines). Returns index.json's task entries."""
    options = FitOptions(val_fraction=val_fraction, seed=seed)
    token_files = {split: staging / name for split, name in PACKED_TOKENS.items()}
    corpus = raw_corpus(data, options, None, None, log, token_files)  # tokenised straight into the pack
    if len(corpus.train_tokens) < MIN_CONTEXT + 2 or len(corpus.val_tokens) < 2:
        raise InputError(
            f"{data}: too little text to pack ({len(corpus.train_tokens)} training and {len(corpus.val_tokens)} "
            "validation tokens); give more text"
        )
    text = "\n".join(corpus.train_text(MAX_BASELINE_BYTES)).encode()[:MAX_BASELINE_BYTES]
    (staging / PACKED_BASELINE_TEXT).write_bytes(text)
    with open(staging / PACKED_VAL_TEXT, "w") as f:
        f.writelines(json.dumps(text) + "\n" for text in corpus.val_text())
    task = GenerateTask(corpus.tokenizer)
    return {
        "task": "generate", **task.to_json(), "source": str(data), "units": "tokens",
        "token_dtype": str(corpus.train_tokens.dtype),
        "n_train": len(corpus.train_tokens), "n_val": len(corpus.val_tokens), "val_fraction": val_fraction,
        "seed": seed, "summary": corpus.summary,
        "shards": [
            {"file": PACKED_TOKENS[split], "split": split, "count": len(tokens)}
            for split, tokens in (("train", corpus.train_tokens), ("val", corpus.val_tokens))
        ],
        "skipped": [p.to_json() for p in corpus.problems],
    }  # fmt: skip


def packed_corpus(data: Path, options: FitOptions, saved: dict | None, donor, log=print) -> Corpus:
    """A folder `pack_corpus` wrote: its token files mapped, its tokenizer (a resumed run's must be the same)."""
    index = read_pack(data, "generate", options.val_fraction, log)
    if donor is not None:
        raise InputError(
            f"--init with packed text: {data} was tokenised with its own tokenizer, which the --init run's "
            "embeddings do not read; train from the raw text with --init instead"
        )
    tokenizer_json = index["preprocessing"]["tokenizer"]
    if saved and saved["preprocessing"]["tokenizer"] != tokenizer_json:
        raise RunMismatch(f"--resume: {data} was tokenised differently from the run; use the same data")
    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
    for name in (PACKED_BASELINE_TEXT, PACKED_VAL_TEXT):
        if not (Path(data) / name).is_file():
            raise InputError(f"{Path(data) / name}: missing from the packed corpus; pack it again")
    dtype = np.dtype(index["token_dtype"])
    tokens = {}
    for shard in index["shards"]:
        path = Path(data) / shard["file"]
        expected = shard["count"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise InputError(f"{path}: {path.stat().st_size} bytes, index.json expects {expected}; pack it again")
        tokens[shard["split"]] = np.memmap(path, dtype=dtype, mode="r", shape=(shard["count"],))
    summary = index["summary"] | {"packed_from": index["source"]}
    log(f"{data}: {index['n_train']:,} + {index['n_val']:,} packed tokens, vocabulary {tokenizer.get_vocab_size()}")

    def train_text(max_chars: int | None = None) -> Iterable[str]:
        text = (Path(data) / PACKED_BASELINE_TEXT).read_bytes().decode("utf-8", errors="replace")
        yield text if max_chars is None else text[:max_chars]

    def val_text() -> Iterable[str]:
        with open(Path(data) / PACKED_VAL_TEXT) as f:
            for line in f:
                yield json.loads(line)

    problems = [Problem(p["path"], p["reason"]) for p in index["skipped"]]
    return Corpus(tokenizer, tokens["train"], tokens["val"], summary, problems, train_text, val_text)


def _mapped_tokens(tokenizer: Tokenizer, texts: Iterable[str], name: str) -> np.ndarray:
    """Tokenise into a scratch file and map it; the file is unlinked at once (the mapping keeps it alive)."""
    path = scratch_token_file(name)
    try:
        return write_tokens(tokenizer, texts, path)
    finally:
        path.unlink(missing_ok=True)


def _context_len(n_train_tokens: int) -> int:
    """256 tokens for a real corpus; shorter windows for a tiny one, so that it still has many windows."""
    if n_train_tokens >= 50 * DEFAULT_CONTEXT:
        return DEFAULT_CONTEXT
    return int(min(SMALL_CONTEXT, max(MIN_CONTEXT, 2 ** math.floor(math.log2(max(n_train_tokens // 4, 1))))))


def _prompt_from(text: str) -> str:
    """The start of a validation text, cut at a word boundary: a prompt the model has never seen."""
    head = text.lstrip()[:SAMPLE_PROMPT_CHARS]
    return head.rsplit(" ", 1)[0] if " " in head else head


__all__ = ["END_OF_TEXT", "GenerateTask", "Generation"]
