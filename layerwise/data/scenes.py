"""Demo object-detection data that ships offline: Fashion-MNIST objects pasted onto real photos.

Each scene is a random crop of one of scikit-image's bundled sample photographs, with 0 to
``max_objects`` Fashion-MNIST items pasted on it, each tinted and blended with its own glyph
intensity as alpha so it keeps its shape and texture. A box is the exact bounding box of the
pasted pixels (alpha > 0 after cutting a faint halo), not the rectangle the glyph was pasted in,
so the box touches the object on all four sides and every pixel outside all boxes is background.

Written as COCO (``images/scene_00000.png`` + ``annotations.json``), read back with
`layerwise.data.detection.read_detection`. Idempotent like `prepare_fashion_mnist`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from layerwise.data.datasets import (
    FASHION_MNIST_CLASSES,
    PNG_COMPRESS_LEVEL,
    DatasetUnavailable,
    _build_folder,
    _is_complete,
    load_fashion_mnist_arrays,
)

# Fashion-MNIST classes whose outlines differ (shirts, pullovers and coats look alike at this size).
SCENE_CLASSES: tuple[str, ...] = ("trouser", "bag", "sneaker", "dress", "ankle_boot")
# scikit-image's bundled samples (no download): portraits, textures, space, microscopy, text.
BACKGROUND_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "brick",
    "moon",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "clock",
    "page",
    "text",
)
SCENES_FORMAT_VERSION = 1  # bump when the bytes written for the same arguments change
MIN_SCENE_SIDE = 32  # pixels; below this the smallest objects are a few pixels across
BACKGROUND_CROP = (0.35, 1.0)  # square crop side, as a fraction of the photo's shorter side
OBJECT_SIZE = (0.18, 0.45)  # object's longer side, as a fraction of the scene side
NEGATIVE_FRACTION = 0.1  # scenes with no object at all
MAX_IOU = 0.3  # a placement overlapping an earlier box more than this is redrawn
PLACEMENT_TRIES = 20  # redraws before the object is left out
ALPHA_CUT = 0.1  # alpha at or below this is set to 0: the faint bilinear halo is not the object
ALPHA_GAIN = 1.5  # glyph intensity 0.67 and above is opaque, so objects read as solid on busy photos
SHADE_FLOOR = 0.55  # darker glyph parts get down to 55% of the tint: keeps the item's texture
MIN_CONTRAST = 0.3  # tint brightness differs from the covered background's mean by at least this
IMAGES_DIR = "images"
ANNOTATIONS_FILE = "annotations.json"


@dataclass(frozen=True)
class PlacedObject:
    """One pasted item. ``alpha`` and ``colour`` cover exactly its box."""

    label: int  # index into the scene's classes
    fashion_index: int  # position in the Fashion-MNIST split's IDX file
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 pixel edges: exact bounds of alpha > 0
    alpha: np.ndarray  # float32 (y1 - y0, x1 - x0) in [0, 1]; every row and column has a nonzero
    colour: np.ndarray  # float32 (y1 - y0, x1 - x0, 3) in [0, 1]

    @property
    def mask_area(self) -> int:
        return int(np.count_nonzero(self.alpha))


@dataclass(frozen=True)
class Scene:
    photo: str  # name of the skimage.data photograph the background was cropped from
    background: np.ndarray  # uint8 (side, side, 3)
    objects: list[PlacedObject]


def compose_scenes(
    out_dir: Path,
    n_images: int,
    seed: int = 0,
    side: int = 128,
    split: str = "train",
    max_objects: int = 4,
    classes: tuple[str, ...] = SCENE_CLASSES,
) -> Path:
    """Write ``n_images`` scenes of ``side`` x ``side`` RGB pixels as COCO into ``out_dir`` and return it.

    ``split`` picks the Fashion-MNIST images the objects come from (test scenes use objects no
    training scene has). Scene ``i`` depends only on (seed, i, side, split, max_objects, classes),
    so a larger ``n_images`` extends a smaller one. A second call with the same arguments returns
    at once without touching the files.
    """
    _check_arguments(n_images, side, max_objects, classes)
    out_dir = Path(out_dir)
    identity = {
        "dataset": "fashion-scenes",
        "format_version": SCENES_FORMAT_VERSION,
        "n_images": n_images,
        "seed": seed,
        "side": side,
        "split": split,
        "max_objects": max_objects,
        "classes": classes,
    }
    if _is_complete(out_dir, identity):
        return out_dir
    glyphs, pools = _object_pools(split, classes)
    photos = load_background_photos()

    def write(staging: Path) -> dict[str, Any]:
        (staging / IMAGES_DIR).mkdir()
        coco_images: list[dict[str, Any]] = []
        coco_annotations: list[dict[str, Any]] = []
        for index in range(n_images):
            scene = plan_scene(index, seed, side, max_objects, glyphs, pools, photos)
            file_name = f"{IMAGES_DIR}/scene_{index:05d}.png"
            _write_png(render_scene(scene), staging / file_name)
            coco_images.append(
                {"id": index + 1, "file_name": file_name, "width": side, "height": side, "background": scene.photo}
            )
            for obj in scene.objects:
                x0, y0, x1, y1 = obj.box
                coco_annotations.append(
                    {
                        "id": len(coco_annotations) + 1,
                        "image_id": index + 1,
                        "category_id": obj.label + 1,  # COCO numbers categories from 1
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": obj.mask_area,  # COCO's area is the object's pixel count, not the box's
                        "iscrowd": 0,
                        "fashion_index": obj.fashion_index,
                    }
                )
        coco = {
            "info": {
                "description": f"Fashion-MNIST {split} objects on scikit-image photos",
                **_identity_info(identity),
            },
            "images": coco_images,
            "annotations": coco_annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
        }
        (staging / ANNOTATIONS_FILE).write_text(json.dumps(coco, indent=1), encoding="utf-8")
        negatives = n_images - len({a["image_id"] for a in coco_annotations})
        return {"count": n_images, "objects": len(coco_annotations), "negatives": negatives}

    _build_folder(out_dir, identity, write)
    return out_dir


def _identity_info(identity: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in identity.items()}


def _check_arguments(n_images: int, side: int, max_objects: int, classes: tuple[str, ...]) -> None:
    if n_images < 1:
        raise ValueError(f"n_images must be a positive number of scenes, got {n_images}")
    if side < MIN_SCENE_SIDE:
        raise ValueError(f"side must be at least {MIN_SCENE_SIDE} pixels, got {side}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be 0 or more, got {max_objects}")
    unknown = [name for name in classes if name not in FASHION_MNIST_CLASSES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise ValueError(
            f"classes must be distinct Fashion-MNIST class names ({', '.join(FASHION_MNIST_CLASSES)}), got {classes}"
        )


def _object_pools(split: str, classes: tuple[str, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(all glyphs (N, 28, 28) uint8 of the split, per scene class the glyph indices of that class)."""
    images, labels = load_fashion_mnist_arrays(split)
    pools = [np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(name)) for name in classes]
    return images, pools


def load_background_photos() -> dict[str, Image.Image]:
    """The bundled scikit-image photographs as RGB PIL images, by name."""
    try:
        import skimage.data
    except ImportError as err:
        raise DatasetUnavailable("scikit-image is not installed; install it with 'pip install scikit-image'") from err
    photos: dict[str, Image.Image] = {}
    for name in BACKGROUND_PHOTOS:
        array = getattr(skimage.data, name)()
        photos[name] = Image.fromarray(array).convert("RGB")  # grayscale (H, W) -> (H, W, 3)
    return photos


def plan_scene(
    index: int,
    seed: int,
    side: int,
    max_objects: int,
    glyphs: np.ndarray,
    pools: list[np.ndarray],
    photos: dict[str, Image.Image],
) -> Scene:
    """Draw scene ``index``: its background crop and objects, from a generator seeded by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    photo = BACKGROUND_PHOTOS[rng.integers(len(BACKGROUND_PHOTOS))]
    background = _crop_background(photos[photo], side, rng)
    n_objects = 0 if max_objects == 0 or rng.random() < NEGATIVE_FRACTION else int(rng.integers(1, max_objects + 1))
    objects: list[PlacedObject] = []
    for _ in range(n_objects):
        label = int(rng.integers(len(pools)))
        fashion_index = int(rng.choice(pools[label]))
        alpha, shade = _object_patch(glyphs[fashion_index], side, rng)
        h, w = alpha.shape
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(side - w + 1)), int(rng.integers(side - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, other.box) <= MAX_IOU for other in objects):
                tint = _tint(background[y0 : y0 + h, x0 : x0 + w], alpha, rng)
                colour = tint[None, None, :] * shade[:, :, None]  # (h, w, 3)
                objects.append(PlacedObject(label, fashion_index, box, alpha, colour.astype(np.float32)))
                break
    return Scene(photo, background, objects)


def _crop_background(photo: Image.Image, side: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (random position and scale) resized to (side, side, 3) uint8."""
    width, height = photo.size
    crop = rng.uniform(*BACKGROUND_CROP) * min(width, height)
    x0, y0 = rng.uniform(0, width - crop), rng.uniform(0, height - crop)
    resized = photo.resize((side, side), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop))
    if rng.random() < 0.5:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(resized, dtype=np.uint8)


def _object_patch(glyph: np.ndarray, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scale a (28, 28) glyph so its longer side is a random OBJECT_SIZE fraction of ``side``.

    Returns (alpha, shade), float32 (h, w), cropped to the exact bounds of alpha > 0.
    """
    rows, cols = np.nonzero(glyph > ALPHA_CUT * 255)
    tight = glyph[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # drop the empty margin
    longest = rng.uniform(*OBJECT_SIZE) * side
    scale = longest / max(tight.shape)
    size = (max(1, round(tight.shape[1] * scale)), max(1, round(tight.shape[0] * scale)))  # PIL: (w, h)
    resized = Image.fromarray(tight).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    intensity = np.asarray(resized, dtype=np.float32) / 255.0  # (h, w) in [0, 1]
    alpha = np.where(intensity > ALPHA_CUT, np.minimum(intensity * ALPHA_GAIN, 1.0), 0.0).astype(np.float32)
    rows, cols = np.nonzero(alpha)
    window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    shade = SHADE_FLOOR + (1.0 - SHADE_FLOOR) * intensity
    return alpha[window], shade[window].astype(np.float32)


def _tint(covered: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour (3,) in [0, 1] whose brightness stands off the background it will cover."""
    under = float(covered.reshape(-1, 3)[alpha.reshape(-1) > 0].mean()) / 255.0
    hue = rng.uniform(0.2, 1.0, size=3)
    hue /= hue.max()  # brightest channel at 1: the brightness below sets the level
    if under >= 0.5:
        brightness = rng.uniform(0.1, max(0.1, under - MIN_CONTRAST))
    else:
        brightness = rng.uniform(min(1.0, under + MIN_CONTRAST), 1.0)
    return (hue * brightness).astype(np.float32)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 (side, side, 3): objects alpha-blended over the background in order."""
    image = scene.background.astype(np.float32) / 255.0
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        a = obj.alpha[:, :, None]  # (h, w, 1)
        region = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = region * (1.0 - a) + obj.colour * a
    # Where alpha is 0 the blend returns the background's float exactly, so it rounds back to it.
    return np.rint(image * 255.0).astype(np.uint8)


def _write_png(image: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    path.write_bytes(buffer.getbuffer())
