"""Discover labelled examples on disk: a folder of class folders, or a CSV manifest.

Nothing here decodes media; that is the modality front end's job. Every file or CSV row that
cannot be used becomes a `Problem` naming it, so nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from layerwise.errors import InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg"})
TEXT_EXTENSIONS = frozenset({".txt"})
MODALITIES = ("image", "audio", "text")


@dataclass(frozen=True)
class Example:
    """One input: a file (`path`), its bytes already in memory (`data`), or an inline text (`text`), with its
    label when known."""

    origin: str  # what a person reads in a message: the file path or "data.csv line 7"
    label: str | None
    path: Path | None = None
    text: str | None = None
    data: bytes | None = None  # an upload's content (`layerwise serve`): decoded as the file would be

    @property
    def content(self) -> Path | bytes:
        """What a decoder reads: the bytes in memory when there are some, else the file."""
        return self.data if self.data is not None else self.path


@dataclass(frozen=True)
class Problem:
    """An input that was skipped, and why."""

    origin: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.origin, "reason": self.reason}


def problems_note(problems: list[Problem], shown: int = 5) -> str:
    """ "3 skipped: a.png (reason), b.png (reason) and 1 more" for an error message; "" when there are none."""
    if not problems:
        return ""
    named = ", ".join(f"{p.origin} ({p.reason})" for p in problems[:shown])
    more = f" and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} skipped: {named}{more}"


@dataclass(frozen=True)
class Source:
    """What was found under DATA: usable-looking examples, skipped items and the modality."""

    examples: list[Example]
    problems: list[Problem]
    modality: str
    root: Path
    class_names: list[str]  # every class named in the data, even one whose files all fail

    @property
    def labels(self) -> list[str]:
        return [ex.label for ex in self.examples]


def modality_of_extension(suffix: str) -> str | None:
    suffix = suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    if suffix in TEXT_EXTENSIONS:
        return "text"
    return None


def discover(data: str | Path, modality: str | None = None, labelled: bool = True) -> Source:
    """Find examples under `data` (a class-folder tree or a CSV manifest).

    `labelled=False` accepts a plain folder or list of files for prediction.
    Raises InputError when `data` cannot be read at all.
    """
    if modality is not None and modality not in MODALITIES:
        raise InputError(f"--modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    root = Path(data)
    if not root.exists():
        raise InputError(f"{root}: no such file or directory")
    if root.is_file() and root.suffix.lower() == ".csv":
        examples, problems, class_names = _read_manifest(root, labelled)
    elif root.is_dir():
        examples, problems = _read_class_folders(root, labelled)
        class_names = {ex.label for ex in examples if ex.label is not None}
    elif root.is_file() and not labelled:
        examples, problems = [Example(origin=str(root), label=None, path=root)], []
        class_names = set()
    else:
        raise InputError(f"{root}: expected a folder of class folders or a .csv manifest")
    return _settle_modality(examples, problems, modality, root, class_names)


def discover_files(paths: list[Path], modality: str | None = None) -> Source:
    """Unlabelled inputs for prediction: files, and folders searched recursively."""
    examples: list[Example] = []
    problems: list[Problem] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        found = discover(path, modality, labelled=False)
        examples += found.examples
        problems += found.problems
    root = paths[0] if paths else Path(".")
    return _settle_modality(examples, problems, modality, root, set())


def _read_class_folders(root: Path, labelled: bool) -> tuple[list[Example], list[Problem]]:
    examples: list[Example] = []
    problems: list[Problem] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if labelled and not class_dirs:
        raise InputError(
            f"{root}: no class folders found; expected one subfolder per class, "
            f"e.g. {root}/cat/1.jpg, or a CSV manifest with a 'label' column"
        )
    if labelled:
        for stray in sorted(p for p in root.iterdir() if p.is_file() and _visible(p, root)):
            problems.append(Problem(str(stray), "file outside any class folder"))
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.rglob("*") if p.is_file() and _visible(p, root))
            if not files:
                raise InputError(f"{class_dir}: class folder '{class_dir.name}' is empty")
            examples += [Example(str(p), class_dir.name, path=p) for p in files]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and _visible(p, root))
        examples = [Example(str(p), None, path=p) for p in files]
    return examples, problems


def _visible(path: Path, root: Path) -> bool:
    # Hidden files (.DS_Store, editor swap files, our own markers) are not data, nor is anything in
    # a hidden folder at any depth below `root`; a hidden `root` itself is what the user asked for.
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def open_manifest(csv_path: Path) -> tuple[csv.DictReader, list[str]]:
    """A DictReader over a UTF-8 CSV file and its column names (stripped); not UTF-8 is an InputError."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{csv_path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    # newline="" lets csv see quoted newlines; str.splitlines() would also split on U+2028, \f, ...
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return reader, [c.strip() for c in (reader.fieldnames or [])]


def _read_manifest(csv_path: Path, labelled: bool) -> tuple[list[Example], list[Problem], set[str]]:
    """Examples and problems from a CSV manifest, and every label named in it (even on bad rows)."""
    reader, columns = open_manifest(csv_path)
    if labelled and "label" not in columns:
        raise InputError(
            f"{csv_path}: no 'label' column (columns found: {', '.join(columns)}); "
            "to train a text generator on the 'text' column, pass --task generate"
        )
    if "path" not in columns and "text" not in columns:
        raise InputError(
            f"{csv_path}: needs a 'path' column (files relative to the CSV) or a 'text' column "
            f"(columns found: {', '.join(columns)})"
        )
    examples: list[Example] = []
    problems: list[Problem] = []
    class_names: set[str] = set()
    for row in manifest_rows(reader, csv_path):
        row = {(k or "").strip(): (v or "") for k, v in row.items()}
        # line_num counts physical lines read (blank lines, quoted newlines): the row's last line.
        origin = f"{csv_path} line {reader.line_num}"
        label = row.get("label", "").strip() or None
        if label is not None:
            class_names.add(label)
        if labelled and label is None:
            problems.append(Problem(origin, "empty label"))
            continue
        if "path" in columns and row.get("path", "").strip():
            path = (csv_path.parent / row["path"].strip()).resolve()
            if not path.is_file():
                problems.append(Problem(origin, f"file not found: {row['path'].strip()}"))
                continue
            examples.append(Example(f"{path} ({origin})", label, path=path))
        elif "text" in columns:
            if not row.get("text", "").strip():
                problems.append(Problem(origin, "empty text"))
                continue
            examples.append(Example(origin, label, text=row["text"]))
        else:
            problems.append(Problem(origin, "empty path"))
    return examples, problems, class_names


def manifest_rows(reader: csv.DictReader, csv_path: Path) -> Iterator[dict]:
    """The reader's rows; a malformed CSV (e.g. a field over the 128 KiB limit) is an InputError."""
    try:
        yield from reader
    except csv.Error as err:
        # line_num counts the lines fully read; the error is in the next one.
        raise InputError(f"{csv_path} line {reader.line_num + 1}: malformed CSV ({err})") from err


def _settle_modality(
    examples: list[Example],
    problems: list[Problem],
    modality: str | None,
    root: Path,
    class_names: set[str],
) -> Source:
    """Pick the modality (majority of file types unless given) and skip files that do not fit."""
    kinds = [("text" if ex.text is not None else modality_of_extension(ex.path.suffix)) for ex in examples]
    if modality is None:
        counts = Counter(k for k in kinds if k is not None)
        if not counts:
            raise InputError(
                f"{root}: no usable files (images: {', '.join(sorted(IMAGE_EXTENSIONS))}; "
                f"audio: {', '.join(sorted(AUDIO_EXTENSIONS))}; text: .txt or a CSV 'text' column)"
            )
        modality = counts.most_common(1)[0][0]
    kept: list[Example] = []
    for example, kind in zip(examples, kinds, strict=True):
        if kind == modality:
            kept.append(example)
        elif kind is None:
            problems.append(Problem(example.origin, f"unknown file type '{example.path.suffix}'"))
        else:
            article = "an" if modality[0] in "aeiou" else "a"
            problems.append(Problem(example.origin, f"{kind} file in {article} {modality} dataset"))
    found = sorted(class_names)
    return Source(examples=kept, problems=problems, modality=modality, root=root, class_names=found)


def check_trainable(labels: list[str], class_names_found: list[str], root: Path) -> None:
    """Fail before training when what is left cannot train."""
    counts = Counter(labels)
    missing = [name for name in class_names_found if counts[name] == 0]
    if missing:
        raise InputError(
            f"{root}: class {', '.join(repr(m) for m in missing)} has no usable examples "
            "(see the skipped files listed above)"
        )
    if len(counts) < 2:
        only = f" (only {next(iter(counts))!r})" if counts else ""
        raise InputError(f"{root}: need at least 2 classes with usable examples{only}")
