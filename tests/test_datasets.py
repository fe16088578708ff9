"""Behaviour tests for the built-in offline datasets, on the real Debian data."""

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from layerwise.data import datasets
from layerwise.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FORTUNES_DIR,
    MARKER_NAME,
    SPOKEN_DIGITS,
    DatasetUnavailable,
    prepare_fashion_mnist,
    prepare_fortunes,
    read_fortunes,
    synthesize_spoken_digits,
)

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").is_file(),
    reason="needs 'sudo apt-get install dataset-fashion-mnist'",
)
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs 'sudo apt-get install espeak-ng'")
needs_fortunes = pytest.mark.skipif(
    not FORTUNES_DIR.is_dir(), reason="needs 'sudo apt-get install fortunes fortunes-min'"
)

PER_CLASS = 6


def _raw_idx(name: str, header: int) -> np.ndarray:
    # Independent reference reader: skip the header, trust the file.
    with gzip.open(FASHION_MNIST_DIR / name, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# --- Fashion-MNIST -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_fashion_mnist(tmp_path_factory.mktemp("fmnist"), "train", per_class=PER_CLASS)


@needs_fashion
def test_fashion_folder_layout(fashion_small: Path) -> None:
    assert fashion_small.name == "train"
    class_dirs = sorted(p.name for p in fashion_small.iterdir() if p.is_dir())
    assert class_dirs == sorted(FASHION_MNIST_CLASSES)
    for name in FASHION_MNIST_CLASSES:
        files = sorted((fashion_small / name).iterdir())
        assert len(files) == PER_CLASS
        for path in files:
            assert path.suffix == ".png" and path.stem.startswith("train_")
            with Image.open(path) as image:
                assert image.size == (28, 28) and image.mode == "L"
    # Nothing left behind by staging next to the published folder.
    assert [p.name for p in fashion_small.parent.iterdir()] == ["train"]


@needs_fashion
def test_fashion_pixels_and_labels_match_the_idx_files(fashion_small: Path) -> None:
    labels = _raw_idx("train-labels-idx1-ubyte.gz", header=8)
    images = _raw_idx("train-images-idx3-ubyte.gz", header=16).reshape(-1, 28, 28)
    for class_index, name in enumerate(FASHION_MNIST_CLASSES):
        indices = sorted(int(p.stem.split("_")[1]) for p in (fashion_small / name).iterdir())
        # per_class keeps the first N examples of each class, in file order
        assert indices == np.flatnonzero(labels == class_index)[:PER_CLASS].tolist()
        for i in indices:
            written = np.asarray(Image.open(fashion_small / name / f"train_{i:05d}.png"))
            np.testing.assert_array_equal(written, images[i])


@needs_fashion
def test_fashion_classes_look_different(fashion_small: Path) -> None:
    def mean_image(name: str) -> np.ndarray:
        paths = sorted((fashion_small / name).iterdir())
        return np.mean([np.asarray(Image.open(p), dtype=np.float64) for p in paths], axis=0)

    # Trousers are two tall narrow legs; bags are wide blocks: their means differ a lot.
    assert np.abs(mean_image("trouser") - mean_image("bag")).mean() > 20


@needs_fashion
def test_fashion_is_idempotent_and_rebuilds_on_new_arguments(tmp_path: Path) -> None:
    split_dir = prepare_fashion_mnist(tmp_path, "test", per_class=2)
    before = _mtimes(split_dir)
    # The second call trusts the marker: it neither reads the source nor rewrites a file.
    again = prepare_fashion_mnist(tmp_path, "test", per_class=2, source_dir=tmp_path / "gone")
    assert again == split_dir
    assert _mtimes(split_dir) == before

    prepare_fashion_mnist(tmp_path, "test", per_class=3)
    assert len(list(split_dir.rglob("*.png"))) == 3 * len(FASHION_MNIST_CLASSES)
    assert json.loads((split_dir / MARKER_NAME).read_text())["per_class"] == 3


@needs_fashion
def test_fashion_process_pool_writes_the_same_files(tmp_path: Path, monkeypatch) -> None:
    # Lower the threshold so a small run goes through the worker processes in several chunks.
    monkeypatch.setattr(datasets, "MIN_IMAGES_FOR_POOL", 100)
    monkeypatch.setattr(datasets, "PNG_CHUNK_SIZE", 70)
    split_dir = prepare_fashion_mnist(tmp_path, "test", per_class=40)
    counts = {name: len(list((split_dir / name).iterdir())) for name in FASHION_MNIST_CLASSES}
    assert counts == dict.fromkeys(FASHION_MNIST_CLASSES, 40)
    marker = json.loads((split_dir / MARKER_NAME).read_text())
    assert marker["count"] == 400 and marker["per_class"] == 40
    labels = _raw_idx("t10k-labels-idx1-ubyte.gz", header=8)
    images = _raw_idx("t10k-images-idx3-ubyte.gz", header=16).reshape(-1, 28, 28)
    for path in sorted(split_dir.rglob("*.png")):
        i = int(path.stem.split("_")[1])
        assert path.parent.name == FASHION_MNIST_CLASSES[labels[i]]
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[i])


@needs_fashion
def test_fashion_failed_run_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fail_midway(chunk):
        images, paths = chunk
        Path(paths[0]).write_bytes(b"partial")
        calls.append(paths[0])
        raise OSError("disk full")

    monkeypatch.setattr(datasets, "_write_png_chunk", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        prepare_fashion_mnist(tmp_path, "train", per_class=1)
    assert calls and list(tmp_path.iterdir()) == []  # no half folder, no staging left over


def test_fashion_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "my_notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by layerwise"):
        prepare_fashion_mnist(tmp_path, "train", per_class=1, source_dir=_tiny_idx_dir(tmp_path))
    assert (tmp_path / "train" / "my_notes.txt").read_text() == "keep me"


def _tiny_idx_dir(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    labels = np.arange(20) % 10
    images = np.repeat(labels[:, None, None] * 25, 28 * 28).reshape(20, 28, 28)
    _write_idx(source / "train-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(source / "train-labels-idx1-ubyte.gz", 0x801, labels)
    return source


def test_fashion_reads_any_source_dir(tmp_path: Path) -> None:
    split_dir = prepare_fashion_mnist(tmp_path / "out", source_dir=_tiny_idx_dir(tmp_path))
    for class_index, name in enumerate(FASHION_MNIST_CLASSES):
        paths = sorted((split_dir / name).iterdir())
        assert [p.name for p in paths] == [
            f"train_{class_index:05d}.png",
            f"train_{class_index + 10:05d}.png",
        ]
        assert np.asarray(Image.open(paths[0])).max() == class_index * 25


def test_fashion_missing_data_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "missing")
    assert not (tmp_path / "out" / "train").exists()


def test_fashion_corrupt_file_is_named(tmp_path: Path) -> None:
    source = _tiny_idx_dir(tmp_path)
    _write_idx(source / "train-labels-idx1-ubyte.gz", 0x803, np.zeros((20, 1, 1)))  # wrong magic
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*magic number 0x00000803"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=source)

    (source / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is not a readable gzip"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=source)

    with gzip.open(source / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x801).to_bytes(4, "big") + (20).to_bytes(4, "big") + bytes(5))  # truncated
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is truncated"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=source)


def test_fashion_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        prepare_fashion_mnist(tmp_path, "validation")


# --- Spoken digits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_spoken_digits(tmp_path_factory.mktemp("digits"), per_class=3)


@needs_espeak
def test_digits_are_readable_speech_clips(digits: Path) -> None:
    assert sorted(p.name for p in digits.iterdir() if p.is_dir()) == sorted(SPOKEN_DIGITS)
    for word in SPOKEN_DIGITS:
        paths = sorted((digits / word).iterdir())
        assert [p.name for p in paths] == [f"{word}_{i:03d}.wav" for i in range(3)]
        for path in paths:
            audio, rate = sf.read(path, dtype="float32")
            assert rate == 22050 and audio.ndim == 1
            assert 0.2 < len(audio) / rate < 3.0  # one spoken word, in seconds
            assert np.sqrt(np.mean(audio**2)) > 0.01  # not silence


@needs_espeak
def test_digit_clips_differ_in_voice_speed_and_pitch(digits: Path) -> None:
    clips = json.loads((digits / MARKER_NAME).read_text())["clips"]
    seven = [clips[f"seven/seven_{i:03d}.wav"] for i in range(3)]
    assert len({c["voice"] for c in seven}) == 3  # variants are dealt without repeats
    audio = [sf.read(digits / "seven" / f"seven_{i:03d}.wav")[0] for i in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            n = min(len(audio[a]), len(audio[b]))
            assert len(audio[a]) != len(audio[b]) or not np.allclose(audio[a][:n], audio[b][:n])


@needs_espeak
def test_digits_are_deterministic_and_idempotent(digits: Path, tmp_path: Path) -> None:
    before = _mtimes(digits)
    # The second call trusts the marker: it runs no espeak-ng and rewrites no file.
    again = synthesize_spoken_digits(digits, per_class=3, espeak_binary="espeak-ng-absent")
    assert again == digits
    assert _mtimes(digits) == before

    words = ("seven", "nine")
    same = synthesize_spoken_digits(tmp_path / "same", per_class=3, words=words)
    other = synthesize_spoken_digits(tmp_path / "other", per_class=3, words=words, seed=1)
    for name in ("seven/seven_000.wav", "nine/nine_002.wav"):
        # the same seed gives the same clip even with a different word list
        assert (same / name).read_bytes() == (digits / name).read_bytes()
        assert (other / name).read_bytes() != (digits / name).read_bytes()


def test_digits_without_espeak_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install espeak-ng"):
        synthesize_spoken_digits(tmp_path, espeak_binary="espeak-ng-not-installed")


def test_digits_reject_words_that_are_not_folder_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be used as a folder name"):
        synthesize_spoken_digits(tmp_path, words=("one", "../two"))


# --- Fortunes ------------------------------------------------------------------------------

TOPICS = ("computers", "love", "science")


@needs_fortunes
def test_fortunes_csv_round_trips(tmp_path: Path) -> None:
    path = prepare_fortunes(tmp_path, topics=TOPICS, per_class=25)
    assert path == tmp_path / "fortunes.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["text", "label"]
    assert [row["label"] for row in rows] == [t for t in TOPICS for _ in range(25)]
    for topic in TOPICS:
        source = set(read_fortunes(FORTUNES_DIR, topic))
        texts = [row["text"] for row in rows if row["label"] == topic]
        assert len(set(texts)) == 25 and all(t.strip() for t in texts)
        assert set(texts) <= source  # real quotes, newlines and commas intact
    assert any("\n" in row["text"] for row in rows) and any("," in row["text"] for row in rows)


@needs_fortunes
def test_fortunes_sampling_is_seeded_and_csv_idempotent(tmp_path: Path) -> None:
    first = prepare_fortunes(tmp_path / "a", topics=TOPICS, per_class=10, seed=0)
    mtime = first.stat().st_mtime_ns
    assert prepare_fortunes(tmp_path / "a", topics=TOPICS, per_class=10, seed=0) == first
    assert first.stat().st_mtime_ns == mtime
    same = prepare_fortunes(tmp_path / "b", topics=TOPICS, per_class=10, seed=0)
    other = prepare_fortunes(tmp_path / "c", topics=TOPICS, per_class=10, seed=1)
    assert same.read_bytes() == first.read_bytes() != other.read_bytes()


@needs_fortunes
def test_fortunes_folder_layout_takes_all_when_fewer_than_per_class(tmp_path: Path) -> None:
    root = prepare_fortunes(tmp_path / "f", topics=("magic", "love"), per_class=40, layout="folder")
    n_magic = len(read_fortunes(FORTUNES_DIR, "magic"))
    assert n_magic < 40  # a small topic: all of its quotes are kept
    assert len(list((root / "magic").glob("magic_*.txt"))) == n_magic
    assert len(list((root / "love").glob("love_*.txt"))) == 40
    text = (root / "love" / "love_0000.txt").read_text(encoding="utf-8")
    assert text.strip() in read_fortunes(FORTUNES_DIR, "love")
    before = _mtimes(root)
    prepare_fortunes(tmp_path / "f", topics=("magic", "love"), per_class=40, layout="folder")
    assert _mtimes(root) == before


def test_fortunes_parsing_survives_bad_bytes(tmp_path: Path) -> None:
    (tmp_path / "odd").write_bytes(b"%\nfirst \xff\xfe quote\n%\n\n%\nsecond,\n  line two\n%\n")
    prepare_fortunes(tmp_path / "out", topics=("odd",), per_class=None, fortunes_dir=tmp_path)
    with open(tmp_path / "out" / "fortunes.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"text": "first \ufffd\ufffd quote", "label": "odd"},
        {"text": "second,\n  line two", "label": "odd"},
    ]


def test_fortunes_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install fortunes fortunes-min"):
        prepare_fortunes(tmp_path, fortunes_dir=tmp_path / "missing")


def test_fortunes_unknown_topic_lists_the_available_ones(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cats").write_text("meow\n%\n")
    with pytest.raises(ValueError, match=r"no fortune topic 'dogs'.*\['cats'\]"):
        prepare_fortunes(tmp_path / "out", topics=("dogs",), fortunes_dir=tmp_path / "src")
