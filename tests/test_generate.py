"""The generate task: a GPT-style model of a user's own text, on one task-generic core."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FORTUNES = Path("/usr/share/games/fortunes")
TRAIN_ARGS = ["--epochs", "2", "--batch-size", "8", "--checkpoint-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 15 kB of real English: quotes from Debian's fortunes, as one .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "computers.txt"
    path.write_text((FORTUNES / "computers").read_text(encoding="utf-8", errors="replace")[:15_000])
    return path


@pytest.fixture(scope="module")
def generate_run(corpus, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from layerwise.cli import app

    run = tmp_path_factory.mktemp("runs") / "gen"
    result = CliRunner().invoke(app, ["train", str(corpus), "--out", str(run), *TRAIN_ARGS])
    assert result.exit_code == 0, result.stderr
    return run


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_a_txt_file_trains_a_language_model_whose_loss_falls(generate_run) -> None:
    config = json.loads((generate_run / "config.json").read_text())
    assert config["task"] == "generate" and config["model"]["name"] == "gpt_tiny"  # detected from the .txt
    assert (generate_run / "tokenizer.json").is_file()
    lines = history(generate_run)
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] < math.log(config["model"]["config"]["vocab_size"])
    assert len(lines[0]["val_samples"]) >= 1 and all(isinstance(t, str) for t in lines[0]["val_samples"])
    metrics = json.loads((generate_run / "metrics.json").read_text())
    assert {"bits_per_byte", "perplexity", "loss"} <= set(metrics["metrics"])
    assert metrics["baseline"]["bits_per_byte"] > 0 and "Kneser" in metrics["baseline"]["model"]
    assert "bits per byte" in metrics["verdict"]


def test_byte_level_bpe_round_trips_any_utf8() -> None:
    from layerwise.data.corpus import token_bytes, train_bpe

    tokenizer = train_bpe(iter(["plain English text, repeated. " * 40, "Привет, мир! 😀 naïve café"]), 600)
    table = token_bytes(tokenizer)
    for text in ["Hello,\r\n  world", "Привет 😀 \x00\x01 tabs\t", "  leading", "trailing  \n\n", "e\u0301 ﬁ"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert b"".join(table[i] for i in ids) == text.encode()


class Uniform(torch.nn.Module):
    """Equal logits for every token: its loss is log(vocab) nats per token, which a person can compute."""

    def __init__(self, vocab: int, context_len: int) -> None:
        super().__init__()
        self.vocab, self.context_len = vocab, context_len
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.zeros(*ids.shape, self.vocab)


def test_bits_per_byte_matches_a_hand_computation(tmp_path) -> None:
    from layerwise.data.corpus import train_bpe
    from layerwise.tasks.generate import GenerateTask

    tokenizer = train_bpe(iter(["the cat sat on the mat. " * 20]), 300)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat; the dog did not.")
    task = GenerateTask(tokenizer)
    metrics, _ = task.evaluate_data(Uniform(tokenizer.get_vocab_size(), 8), text)
    ids = tokenizer.encode(text.read_text()).ids
    predicted = ids[1:]  # the first token has no context; the end-of-text token (0 bytes) is predicted too
    n_bytes = len(text.read_text().encode()) - len(tokenizer.decode(ids[:1]).encode())
    assert metrics["n_tokens"] == len(predicted) + 1 and metrics["n_bytes"] == n_bytes
    expected = (len(predicted) + 1) * math.log2(tokenizer.get_vocab_size()) / n_bytes
    assert metrics["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(tokenizer.get_vocab_size(), rel=1e-5)


def test_generate_command_streams_and_prints_json(cli, generate_run) -> None:
    code, out, _ = cli("generate", generate_run, "--prompt", "The computer", "--max-new-tokens", "20", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"prompt", "text", "new_tokens", "seconds", "tokens_per_second"}
    assert result["new_tokens"] == 20
    args = ("generate", generate_run, "--prompt", "The computer", "--max-new-tokens", "20", "--temperature", "0")
    code, streamed, _ = cli(*args)
    assert code == 0
    code, again, _ = cli(*args, "--json")
    assert streamed == json.loads(again)["text"] + "\n"  # greedy: the streamed text is the same text


def test_the_api_generates_reproducibly_with_a_seed(generate_run) -> None:
    import layerwise

    model = layerwise.load(generate_run)
    a = model.generate("A program", 30, temperature=1.0, seed=7).text
    b = model.generate("A program", 30, temperature=1.0, seed=7).text
    assert a == b and len(a) > 0
    long_prompt = "word " * 2000  # longer than the context: cut from the left
    assert model.generate(long_prompt, 5, temperature=0).new_tokens == 5


def test_evaluate_prints_the_language_metrics(cli, generate_run, corpus) -> None:
    code, out, _ = cli("evaluate", generate_run, corpus, "--json")
    assert code == 0
    result = json.loads(out)
    assert {"loss", "perplexity", "bits_per_byte", "n_bytes", "n_tokens"} <= set(result)
    assert 0 < result["bits_per_byte"] < 8


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "binary",
        "csv_without_text",
        "too_short",
        "empty_prompt",
        "negative_temperature",
        "wrong_task",
        "layers",
    ],
)
def test_bad_input_is_a_clear_error(cli, generate_run, tmp_path, case) -> None:
    run = tmp_path / "run"
    if case in ("empty", "binary", "csv_without_text", "too_short"):
        data = {"empty": tmp_path / "e.txt", "binary": tmp_path / "b.txt", "too_short": tmp_path / "s.txt"}.get(
            case, tmp_path / "c.csv"
        )
        content = {
            "empty": b"",
            "binary": os.urandom(500) + b"\0" * 500,
            "too_short": b"Only a few words here.",
            "csv_without_text": b"body,author\nhello,me\n",
        }[case]
        data.write_bytes(content)
        code, _, err = cli("train", data, "--out", run, "--task", "generate", "--no-progress")
        assert code == 2
        expected = {"empty": "empty file", "binary": "not text", "too_short": "too little text",
                    "csv_without_text": "no 'text' column"}[case]  # fmt: skip
        assert expected in " ".join(err.split()) and str(data) in " ".join(err.split())
        assert not (run / "config.json").exists()
    elif case == "empty_prompt":
        code, _, err = cli("generate", generate_run, "--prompt", "")
        assert code == 2 and "--prompt" in err
    elif case == "negative_temperature":
        code, _, err = cli("generate", generate_run, "--prompt", "x", "--temperature", "-1")
        assert code == 2 and "--temperature" in err
    elif case == "layers":
        code, _, err = cli("layers", generate_run, tmp_path, "--out", tmp_path / "layers")
        assert code == 2 and "`layerwise layers` does not apply to a generate run" in err
    else:
        code, _, err = cli("predict", generate_run, tmp_path)
        assert code == 2 and "does not apply to a generate run" in err


def test_invalid_utf8_is_replaced_and_counted(cli, corpus, tmp_path) -> None:
    data = tmp_path / "bad.txt"
    data.write_bytes(corpus.read_bytes()[:20_000] + b"\xff\xfe broken \xc3 bytes")
    code, _, err = cli("train", data, "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--no-progress")
    assert code == 0, err
    problems = json.loads((tmp_path / "run" / "problems.json").read_text())["skipped"]
    assert problems[0]["path"] == str(data) and "3 invalid UTF-8 byte(s) replaced" in problems[0]["reason"]


@pytest.mark.slow
def test_a_killed_generate_run_resumes_bitwise_identical(corpus, generate_run, tmp_path) -> None:
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "layerwise", "train", str(corpus), "--out", str(run), *TRAIN_ARGS]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("step_00000006*")) if (run / "checkpoints").is_dir() else True:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(run / "model.safetensors")), load_file(str(generate_run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(history(run)) == strip(history(generate_run))
