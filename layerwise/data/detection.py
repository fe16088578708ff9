"""Read object-detection data: a COCO JSON file or a YOLO ``images/`` + ``labels/`` tree.

Both formats become the same `DetectionSource`: one `AnnotatedImage` per readable image, with
boxes as float32 (x0, y0, x1, y1) pixels of the image file as stored, clipped to it. Every image,
annotation or label line that cannot be used becomes a `Problem` naming the file (and the
annotation id or line), so nothing is dropped silently; only input that leaves no image at all,
or that cannot be parsed as a whole (malformed JSON, no class names), raises `InputError`.

Image sizes come from the file's header (PIL), never from the JSON: annotation files that were
written for resized or re-encoded images are common, and a box is only meaningful against the
pixels a model will see. EXIF orientation is not applied, matching the image front end.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from layerwise.data.shards import refuse_pack
from layerwise.data.sources import IMAGE_EXTENSIONS, Problem, problems_note
from layerwise.errors import InputError

COCO_FILE = "annotations.json"
COCO_GLOB = "instances*.json"  # the names COCO itself uses: instances_train2017.json, ...
YOLO_IMAGES, YOLO_LABELS = "images", "labels"
YOLO_YAML_FILES = ("data.yaml", "data.yml")
YOLO_CLASSES_FILE = "classes.txt"  # LabelImg writes it at the root or inside labels/
YOLO_FIELDS = 5  # class cx cy w h
YOLO_DECIMALS = 6  # normalised coordinates written by write_yolo: 1e-6 of 10,000 px is 0.01 px
COUNT_KEYS = ("images", "objects", "boxes_clipped", "boxes_dropped", "crowd_ignored", "negatives")
# Corrupt or non-image files raise any of these from Image.open / verify.
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class AnnotatedImage:
    """One image file and its objects (K may be 0: a negative, an image with nothing in it)."""

    path: Path
    width: int  # pixels, from the file's header
    height: int
    boxes: np.ndarray  # float32 (K, 4): x0, y0, x1, y1 in pixels, 0 <= x0 < x1 <= width
    labels: np.ndarray  # int64 (K,): indices into DetectionSource.class_names

    @property
    def origin(self) -> str:
        return str(self.path)


@dataclass
class DetectionSource:
    """What was found under DATA: usable images, skipped items, class names and what was counted."""

    images: list[AnnotatedImage]
    class_names: list[str]
    problems: list[Problem]
    root: Path
    format: str  # "coco" or "yolo"
    counts: dict[str, int] = field(default_factory=dict)  # the COUNT_KEYS, each always present


def looks_like_detection(data: Path) -> bool:
    """True for a COCO JSON file, or a folder holding annotations.json or instances*.json at its
    root, or both an images/ and a labels/ folder (YOLO)."""
    data = Path(data)
    if data.is_file():
        return data.suffix.lower() == ".json"
    if not data.is_dir():
        return False
    # Several instances*.json still count: read_detection then says which to keep, which is
    # better than the folder being read as a class-folder tree with one class, "images".
    if (data / COCO_FILE).is_file() or any(p.is_file() for p in data.glob(COCO_GLOB)):
        return True
    return (data / YOLO_IMAGES).is_dir() and (data / YOLO_LABELS).is_dir()


def read_detection(data: Path) -> DetectionSource:
    """Read a COCO or YOLO detection dataset (see the module docstring for the layouts).

    Images are sorted by path. Raises InputError when `data` is neither layout, a file cannot be
    parsed as a whole, or no image at all is usable.
    """
    data = Path(data)
    if not data.exists():
        raise InputError(f"{data}: no such file or directory")
    refuse_pack(data)
    if data.is_file():
        if data.suffix.lower() != ".json":
            raise InputError(f"{data}: expected a COCO .json file or a folder")
        source = _read_coco(data, data.parent)
    elif (coco := _coco_file(data)) is not None:
        source = _read_coco(coco, data)
    elif (data / YOLO_IMAGES).is_dir() and (data / YOLO_LABELS).is_dir():
        source = _read_yolo(data)
    else:
        raise InputError(
            f"{data}: not a detection dataset; expected {COCO_FILE} (COCO) at its root, "
            f"or {YOLO_IMAGES}/ and {YOLO_LABELS}/ folders with data.yaml or {YOLO_CLASSES_FILE} (YOLO)"
        )
    if not source.images:
        note = problems_note(source.problems, shown=3)
        raise InputError(f"{data}: nothing usable: no image could be read" + (f" ({note})" if note else ""))
    return source


def _coco_file(root: Path) -> Path | None:
    if (root / COCO_FILE).is_file():
        return root / COCO_FILE
    found = sorted(p for p in root.glob(COCO_GLOB) if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(
            f"{root}: several COCO files ({names}); keep one per folder, or name the one to use {COCO_FILE}"
        )
    return found[0] if found else None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header; raises OSError-like errors if unreadable.

    ``verify()`` checks the file's structure (PNG chunk CRCs, ...) without decoding all pixels,
    so a truncated or corrupt file is caught here rather than halfway through training.
    """
    with Image.open(path) as img:
        size = img.size
        img.verify()
    return size


def _read_image_size(path: Path, problems: list[Problem]) -> tuple[int, int] | None:
    try:
        if path.stat().st_size == 0:
            problems.append(Problem(str(path), "empty file (0 bytes); image skipped"))
            return None
        return image_size(path)
    except _IMAGE_ERRORS as err:
        problems.append(Problem(str(path), f"cannot read image ({type(err).__name__}: {err}); image skipped"))
        return None


class _Boxes:
    """Accumulates one image's boxes, clipping each to the image and counting what happened."""

    def __init__(self, width: int, height: int, counts: dict[str, int], problems: list[Problem]) -> None:
        self.width, self.height = width, height
        self.counts, self.problems = counts, problems
        self.boxes: list[tuple[float, float, float, float]] = []
        self.labels: list[int] = []

    def add(self, x0: float, y0: float, x1: float, y1: float, label: int, origin: str) -> None:
        """Add a box in pixels (x0, y0, x1, y1); clipped to the image, dropped if no area is left."""
        cx0, cx1 = min(max(x0, 0.0), self.width), min(max(x1, 0.0), self.width)
        cy0, cy1 = min(max(y0, 0.0), self.height), min(max(y1, 0.0), self.height)
        if cx1 <= cx0 or cy1 <= cy0:
            where = "zero or negative size" if (x1 <= x0 or y1 <= y0) else "outside the image"
            self.problems.append(
                Problem(
                    origin,
                    f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has {where}: no area left after clipping to "
                    f"the {self.width}x{self.height} image; box dropped",
                )
            )
            self.counts["boxes_dropped"] += 1
            return
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            self.counts["boxes_clipped"] += 1
        self.boxes.append((cx0, cy0, cx1, cy1))
        self.labels.append(label)

    def image(self, path: Path) -> AnnotatedImage:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.counts["objects"] += len(boxes)
        self.counts["images"] += 1
        self.counts["negatives"] += len(boxes) == 0
        return AnnotatedImage(path, self.width, self.height, boxes, np.asarray(self.labels, dtype=np.int64))


def _key(value: Any) -> int | str | None:
    """An id usable as a dict key (JSON ids are numbers or strings; a list would not hash)."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def _new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_KEYS, 0)


def _finite_numbers(values: Iterable[Any]) -> list[float] | None:
    """The values as floats, or None if any is not a finite number (bools are not numbers here)."""
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        out.append(float(value))
    return out


# ---------------------------------------------------------------------------------------------
# COCO: {"images": [{id, file_name, ...}], "annotations": [{image_id, category_id, bbox, iscrowd}],
# "categories": [{id, name}]}, bbox = [x, y, width, height] in pixels.


def _read_coco(json_path: Path, root: Path) -> DetectionSource:
    data = _load_json(json_path)
    class_ids, class_names = _coco_categories(data, json_path)
    problems: list[Problem] = []
    counts = _new_counts()
    entries = _coco_images(data, json_path, root, problems)  # image id -> (path, JSON size)

    by_image: dict[Any, list[tuple[str, dict[str, Any]]]] = {image_id: [] for image_id in entries}
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise InputError(f"{json_path}: 'annotations' must be a list, found {type(annotations).__name__}")
    for index, ann in enumerate(annotations):
        ann_id = ann.get("id", f"#{index}") if isinstance(ann, dict) else f"#{index}"
        origin = f"{json_path} annotation id {ann_id}"
        if not isinstance(ann, dict):
            problems.append(Problem(origin, f"expected an object, found {type(ann).__name__}"))
        elif ann.get("iscrowd", 0):
            # Crowd regions mark a group, not one object: COCO's own evaluation ignores them.
            counts["crowd_ignored"] += 1
        elif _key(ann.get("image_id")) not in by_image:
            problems.append(Problem(origin, f"image_id {ann.get('image_id')!r} is not in 'images'"))
        else:
            by_image[ann["image_id"]].append((origin, ann))

    images: list[AnnotatedImage] = []
    for image_id, (path, json_size) in sorted(entries.items(), key=lambda item: str(item[1][0])):
        anns = by_image[image_id]
        if not path.is_file():
            lost = f"; its {len(anns)} annotation(s) skipped" if anns else ""
            problems.append(Problem(str(path), f"listed in {json_path.name} (image id {image_id}) but not found{lost}"))
            continue
        size = _read_image_size(path, problems)
        if size is None:
            continue
        if json_size is not None and json_size != size:
            problems.append(
                Problem(
                    str(path),
                    f"{json_path.name} says {json_size[0]}x{json_size[1]} but the file is {size[0]}x{size[1]}; "
                    "kept, with boxes clipped to the file",
                )
            )
        boxes = _Boxes(*size, counts, problems)
        for origin, ann in anns:
            category = _key(ann.get("category_id"))
            bbox = ann.get("bbox")
            numbers = _finite_numbers(bbox) if isinstance(bbox, list) and len(bbox) == 4 else None
            if category not in class_ids:
                problems.append(Problem(origin, f"category_id {ann.get('category_id')!r} is not in 'categories'"))
            elif numbers is None:
                problems.append(Problem(origin, f"bbox must be 4 numbers [x, y, width, height], found {bbox!r}"))
            else:
                x, y, w, h = numbers
                boxes.add(x, y, x + w, y + h, class_ids[category], origin)
        images.append(boxes.image(path))
    return DetectionSource(images, class_names, problems, root, "coco", counts)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} line {err.lineno} column {err.colno}: malformed JSON ({err.msg})") from err
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a COCO object with 'images' and 'categories', found a {type(data).__name__}"
        )
    return data


def _coco_categories(data: dict[str, Any], json_path: Path) -> tuple[dict[Any, int], list[str]]:
    """(category id -> label index, names sorted by category id). Bad categories are an InputError:
    without a trustworthy class list no label can be read."""
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise InputError(f'{json_path}: no \'categories\' list; expected [{{"id": 1, "name": "cat"}}, ...]')
    named: dict[int, str] = {}
    for index, category in enumerate(categories):
        ok = (
            isinstance(category, dict) and isinstance(category.get("id"), int) and isinstance(category.get("name"), str)
        )
        if not ok:
            raise InputError(f"{json_path}: categories[{index}] needs an integer 'id' and a 'name', found {category!r}")
        if category["id"] in named:
            raise InputError(f"{json_path}: category id {category['id']} appears twice in 'categories'")
        named[category["id"]] = category["name"]
    ordered = sorted(named)
    return {cat_id: index for index, cat_id in enumerate(ordered)}, [named[cat_id] for cat_id in ordered]


def _coco_images(
    data: dict[str, Any], json_path: Path, root: Path, problems: list[Problem]
) -> dict[Any, tuple[Path, tuple[int, int] | None]]:
    """Image id -> (resolved path, (width, height) claimed by the JSON or None)."""
    listed = data.get("images")
    if not isinstance(listed, list):
        raise InputError(f"{json_path}: no 'images' list; expected COCO format with 'images' and 'categories'")
    entries: dict[Any, tuple[Path, tuple[int, int] | None]] = {}
    for index, entry in enumerate(listed):
        origin = f"{json_path} images[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or _key(entry.get("id")) is None:
            problems.append(Problem(origin, f"needs an 'id' (number or string) and a 'file_name', found {entry!r}"))
            continue
        if entry["id"] in entries:
            problems.append(Problem(origin, f"image id {entry['id']!r} appears twice in 'images'; later one skipped"))
            continue
        path = root / entry["file_name"]
        if not path.is_file() and (root / YOLO_IMAGES / entry["file_name"]).is_file():
            path = root / YOLO_IMAGES / entry["file_name"]
        width, height = entry.get("width"), entry.get("height")
        json_size = (width, height) if isinstance(width, int) and isinstance(height, int) else None
        entries[entry["id"]] = (path, json_size)
    return entries


# ---------------------------------------------------------------------------------------------
# YOLO: images/<rel>.<ext> and labels/<rel>.txt, lines "class cx cy w h" normalised to [0, 1].


def _read_yolo(root: Path) -> DetectionSource:
    class_names, names_file = _yolo_class_names(root)
    images_dir, labels_dir = root / YOLO_IMAGES, root / YOLO_LABELS
    problems: list[Problem] = []
    counts = _new_counts()
    label_files = {p for p in labels_dir.rglob("*.txt") if p.is_file() and _visible(p, labels_dir) and p != names_file}

    images: list[AnnotatedImage] = []
    for path in sorted(p for p in images_dir.rglob("*") if p.is_file() and _visible(p, images_dir)):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(Problem(str(path), f"unknown file type '{path.suffix}' in {YOLO_IMAGES}/"))
            continue
        label_path = labels_dir / path.relative_to(images_dir).with_suffix(".txt")
        label_files.discard(label_path)
        size = _read_image_size(path, problems)
        if size is None:
            continue
        boxes = _Boxes(*size, counts, problems)
        if label_path.is_file():  # no label file: a negative, as YOLO tools write none for empty images
            try:
                text = label_path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as err:
                problems.append(Problem(str(label_path), f"cannot read labels ({err}); image skipped"))
                continue
            for number, line in enumerate(text.splitlines(), start=1):
                _yolo_line(line, f"{label_path} line {number}", boxes, class_names, names_file)
        images.append(boxes.image(path))

    for orphan in sorted(label_files):
        stem = orphan.relative_to(labels_dir).with_suffix("")
        problems.append(Problem(str(orphan), f"label file with no image (looked for {YOLO_IMAGES}/{stem}.*)"))
    return DetectionSource(images, class_names, problems, root, "yolo", counts)


def _yolo_line(line: str, origin: str, boxes: _Boxes, class_names: list[str], names_file: Path) -> None:
    fields = line.split()
    if not fields:
        return  # blank lines are harmless
    if len(fields) != YOLO_FIELDS:
        extra = " (polygon/segment labels are not supported)" if len(fields) > YOLO_FIELDS else ""
        boxes.problems.append(Problem(origin, f"expected 5 fields 'class cx cy w h', found {len(fields)}{extra}"))
        return
    try:
        class_id = int(fields[0])
        cx, cy, w, h = (float(v) for v in fields[1:])
    except ValueError:
        boxes.problems.append(
            Problem(origin, f"non-numeric field in {line.strip()!r}; expected 'int float float float float'")
        )
        return
    if not all(math.isfinite(v) for v in (cx, cy, w, h)):
        boxes.problems.append(Problem(origin, f"non-finite number in {line.strip()!r}"))
        return
    if not 0 <= class_id < len(class_names):
        boxes.problems.append(
            Problem(
                origin,
                f"class id {class_id} is beyond the {len(class_names)} names in {names_file.name} "
                f"(0..{len(class_names) - 1})",
            )
        )
        return
    W, H = boxes.width, boxes.height  # noqa: N806 - the image's size, as in the YOLO papers
    boxes.add((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H, class_id, origin)


def _yolo_class_names(root: Path) -> tuple[list[str], Path]:
    """Class names from data.yaml ('names' as a list or an {id: name} mapping) or classes.txt."""
    for name in YOLO_YAML_FILES:
        path = root / name
        if path.is_file():
            names = _yaml_names(path)
            if names is not None:
                return names, path
    for path in (root / YOLO_CLASSES_FILE, root / YOLO_LABELS / YOLO_CLASSES_FILE):
        if path.is_file():
            lines = path.read_text(encoding="utf-8-sig").strip().splitlines()
            names = [line.strip() for line in lines]
            if not names or not all(names):
                raise InputError(f"{path}: expected one class name per line, with no blank lines in between")
            return names, path
    raise InputError(
        f"{root}: no class names for the YOLO labels; expected data.yaml with 'names: [cat, dog]' "
        f"(or 'names: {{0: cat, 1: dog}}'), or {YOLO_CLASSES_FILE} with one name per line, next to "
        f"{YOLO_IMAGES}/ and {YOLO_LABELS}/"
    )


def _yaml_names(path: Path) -> list[str] | None:
    """The 'names' of a YOLO data.yaml, or None when it has none (then classes.txt is tried)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: malformed YAML ({getattr(err, 'problem', None) or err})") from err
    names = data.get("names") if isinstance(data, dict) else None
    if names is None:
        return None
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as err:
            raise InputError(f"{path}: 'names' keys must be class ids 0, 1, ...; found {list(names)}") from err
        missing = sorted(set(range(len(by_id))) - set(by_id))
        if missing:
            raise InputError(f"{path}: 'names' must number classes 0..{len(by_id) - 1}; missing {missing}")
        return [by_id[i] for i in range(len(by_id))]
    raise InputError(f"{path}: 'names' must be a non-empty list or {{id: name}} mapping, found {names!r}")


def _visible(path: Path, root: Path) -> bool:
    # Hidden files and folders (.DS_Store, our own markers) are not data.
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def write_yolo(source: DetectionSource, out_dir: Path) -> Path:
    """Write `source` as a YOLO tree: ``out_dir/images/<rel>``, ``labels/<rel>.txt``, ``data.yaml``.

    ``<rel>`` is each image's path under ``source.root`` without a leading ``images/``. Images are
    copied; negatives get an empty label file. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    for image in source.images:
        rel = image.path.relative_to(source.root)
        if rel.parts[0] == YOLO_IMAGES and len(rel.parts) > 1:
            rel = Path(*rel.parts[1:])
        target = out_dir / YOLO_IMAGES / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.path, target)
        scale = np.array([image.width, image.height, image.width, image.height], dtype=np.float64)
        xyxy = image.boxes.astype(np.float64) / scale  # (K, 4) normalised x0, y0, x1, y1
        centre, size = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
        lines = [
            " ".join([str(int(label)), *(f"{v:.{YOLO_DECIMALS}f}" for v in (*c, *s))])
            for label, c, s in zip(image.labels, centre, size, strict=True)
        ]
        label_path = out_dir / YOLO_LABELS / rel.with_suffix(".txt")
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out_dir / YOLO_YAML_FILES[0]).write_text(yaml.safe_dump({"names": list(source.class_names)}), encoding="utf-8")
    return out_dir
