"""Small real data the tests prepare once per session: Fashion-MNIST PNGs, espeak-ng digits, fortunes.

`make test` runs the suite in pytest-xdist workers, one per core. The data and the shared runs below are then built
once, by whichever worker asks first, in a folder every worker sees; the others wait on a file lock.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.data.datasets import prepare_fashion_mnist, prepare_fortunes, synthesize_spoken_digits

# One torch thread in each xdist worker, two in a lone pytest (the machines have 2 cores). Fixtures built before
# a test's own fixture runs get it too, and so do the commands the tests start: runs stay bitwise comparable.
# numpy's OpenBLAS (and any other native pool) started with a thread per core before this ran: limited alike, or
# two workers' numpy code oversubscribes the cores (HOG prediction ran 3x slower).
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(TORCH_THREADS)
threadpool_limits(TORCH_THREADS)
os.environ["OMP_NUM_THREADS"] = str(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """This session's folder; under pytest-xdist, the one all workers share (each has its own inside it)."""
    own = tmp_path_factory.getbasetemp()
    return own.parent if os.environ.get("PYTEST_XDIST_WORKER") else own


def built_once(shared_root: Path, name: str, build: Callable[[], Path]) -> Path:
    """What `build` returns, built by the first worker that asks; the others wait on a lock and reuse it. A build
    that failed is not tried again (its half-made files are in the way): the others fail with its error."""
    built, failed = shared_root / f"{name}.built", shared_root / f"{name}.failed"
    with FileLock(str(shared_root / f"{name}.lock")):
        if failed.exists():
            raise RuntimeError(f"{name} failed to build in another worker: {failed.read_text()}")
        if not built.exists():
            try:
                built.write_text(str(build()))
            except BaseException as err:
                failed.write_text(repr(err))
                raise
        return Path(built.read_text())


@pytest.fixture(scope="session")
def data_root(shared_root) -> Path:
    return shared_root / "data"


@pytest.fixture(scope="session")
def fashion_train(shared_root, data_root) -> Path:
    """60 real Fashion-MNIST images per class, as class folders of PNGs."""
    return built_once(
        shared_root, "fashion_train", lambda: prepare_fashion_mnist(data_root / "fashion", "train", per_class=60)
    )


@pytest.fixture(scope="session")
def fashion_test(shared_root, data_root) -> Path:
    return built_once(
        shared_root, "fashion_test", lambda: prepare_fashion_mnist(data_root / "fashion", "test", per_class=20)
    )


@pytest.fixture(scope="session")
def spoken_digits(shared_root, data_root) -> Path:
    """Spoken digits synthesised with espeak-ng: 10 classes, many voices."""
    return built_once(
        shared_root, "spoken_digits", lambda: synthesize_spoken_digits(data_root / "digits", per_class=12)
    )


@pytest.fixture(scope="session")
def fortunes_csv(shared_root, data_root) -> Path:
    """Quotes from Debian's fortunes, labelled by topic, as a CSV manifest with a text column."""
    topics = ("computers", "politics", "songs-poems")
    return built_once(shared_root, "fortunes_csv", lambda: prepare_fortunes(data_root / "fortunes", topics, 200))


def train_once(shared_root: Path, name: str, args: list[str]) -> Path:
    """shared_root/runs/name, trained once by `layerwise train ARGS --out RUN --no-progress`."""

    def build() -> Path:
        run = shared_root / "runs" / name
        result = CliRunner().invoke(app, ["train", *args, "--out", str(run), "--no-progress"])
        assert result.exit_code == 0, result.stderr
        return run

    return built_once(shared_root, name, build)


@pytest.fixture(scope="session")
def fortunes_run(shared_root, fortunes_csv) -> Path:
    """A 3-topic text run (transformer_tiny, 5 epochs; validation accuracy 0.62-0.67) that tests read but never
    change."""
    # transformer_tiny, not the default pretrained MiniLM (a slower fine-tune), so the shared run stays quick. After 3
    # epochs the accuracy was 0.52-0.67 across seeds and thread counts (0.50 once): too close to the tests' 0.5.
    return train_once(shared_root, "fortunes", [str(fortunes_csv), "--epochs", "5", "--model", "transformer_tiny"])


@pytest.fixture(scope="session")
def fashion_run(shared_root, fashion_train) -> Path:
    """A 10-class image run (600 images, 8 epochs) that tests read but never change."""
    return train_once(shared_root, "fashion", [str(fashion_train), "--epochs", "8"])


@pytest.fixture(scope="session")
def three_class_run(shared_root, data_root, fashion_train) -> Path:
    """A small image run (bag / sneaker / trouser, 2 epochs) that tests read but never change."""
    import shutil

    def data() -> Path:
        folder = data_root / "three_class"
        for name in ("bag", "sneaker", "trouser"):
            shutil.copytree(fashion_train / name, folder / name)
        return folder

    three_classes = built_once(shared_root, "three_class_data", data)
    return train_once(shared_root, "three_class", [str(three_classes), "--epochs", "2", "--batch-size", "16"])


@pytest.fixture(scope="session")
def tiny_generate_run(shared_root, data_root) -> Path:
    """A generate run (1 epoch) on 12 kB of Debian's fortunes, that tests read but never change."""

    def corpus() -> Path:
        text = data_root / "tiny_generate" / "text.txt"
        text.parent.mkdir(parents=True)
        text.write_text(Path("/usr/share/games/fortunes/computers").read_text(errors="replace")[:12_000])
        return text

    text = built_once(shared_root, "tiny_generate_text", corpus)
    return train_once(shared_root, "tiny_generate", [str(text), "--epochs", "1", "--batch-size", "8"])


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
