"""Small real data the tests prepare once per session: Fashion-MNIST PNGs, espeak-ng digits, fortunes."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.data.datasets import prepare_fashion_mnist, prepare_fortunes, synthesize_spoken_digits


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)  # the machines have 2 cores; keeps runs comparable and deterministic


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def fashion_train(data_root) -> Path:
    """60 real Fashion-MNIST images per class, as class folders of PNGs."""
    return prepare_fashion_mnist(data_root / "fashion", "train", per_class=60)


@pytest.fixture(scope="session")
def fashion_test(data_root) -> Path:
    return prepare_fashion_mnist(data_root / "fashion", "test", per_class=20)


@pytest.fixture(scope="session")
def spoken_digits(data_root) -> Path:
    """Spoken digits synthesised with espeak-ng: 10 classes, many voices."""
    return synthesize_spoken_digits(data_root / "digits", per_class=12)


@pytest.fixture(scope="session")
def fortunes_csv(data_root) -> Path:
    """Quotes from Debian's fortunes, labelled by topic, as a CSV manifest with a text column."""
    return prepare_fortunes(data_root / "fortunes", topics=("computers", "politics", "songs-poems"), per_class=200)


@pytest.fixture(scope="session")
def fortunes_run(tmp_path_factory, fortunes_csv) -> Path:
    """A 3-topic text run (transformer_tiny, 3 epochs; validation accuracy ~0.62) that tests read but never change."""
    run = tmp_path_factory.mktemp("runs") / "fortunes"
    # transformer_tiny, not the default pretrained MiniLM (a slower fine-tune), so the shared run stays quick.
    args = ["train", str(fortunes_csv), "--out", str(run), "--epochs", "3", "--model", "transformer_tiny"]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory, fashion_train) -> Path:
    """A 10-class image run (600 images, 8 epochs) that tests read but never change."""
    run = tmp_path_factory.mktemp("runs") / "fashion"
    result = CliRunner().invoke(app, ["train", str(fashion_train), "--out", str(run), "--epochs", "8", "--no-progress"])
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="session")
def three_class_run(fashion_train, tmp_path_factory) -> Path:
    """A small image run (bag / sneaker / trouser, 2 epochs) that tests read but never change."""
    import shutil

    data = tmp_path_factory.mktemp("three_class_data")
    for name in ("bag", "sneaker", "trouser"):
        shutil.copytree(fashion_train / name, data / name)
    run = tmp_path_factory.mktemp("three_class_runs") / "run"
    args = ["train", str(data), "--out", str(run), "--epochs", "2", "--batch-size", "16", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="session")
def tiny_generate_run(tmp_path_factory) -> Path:
    """A generate run (1 epoch) on 12 kB of Debian's fortunes, that tests read but never change."""
    root = tmp_path_factory.mktemp("tiny_generate")
    corpus = root / "text.txt"
    corpus.write_text(Path("/usr/share/games/fortunes/computers").read_text(errors="replace")[:12_000])
    run = root / "gen"
    args = ["train", str(corpus), "--out", str(run), "--epochs", "1", "--batch-size", "8", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return run


class Cli:
    """Runs `layerwise ...` in-process and returns (exit code, stdout, stderr)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | Path) -> tuple[int, str, str]:
        result = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cli() -> Cli:
    return Cli()
