"""The HOG + linear SVM baseline detector on synthetic scenes: bright squares (class 0) and discs (class 1)
of 20-50 px on noisy gray backgrounds, with exact boxes, scored with the same torchmetrics mAP as the network."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from layerwise.errors import InputError
from layerwise.tasks.hog_detector import (
    PAD_CELLS,
    HogConfig,
    HogSvmDetector,
    _hog_grid,
    _positive_features,
    _to_gray,
    _windows,
)

SQUARE, DISC = 0, 1


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.normal(0.3, 0.08, (height, width))


def _draw(image: np.ndarray, kind: int, x0: int, y0: int, side: int, value: float) -> np.ndarray:
    """Paints a filled square or disc into the (H, W) float image; returns its exact box x0, y0, x1, y1."""
    if kind == SQUARE:
        image[y0 : y0 + side, x0 : x0 + side] = value
    else:
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        r = side / 2
        image[(yy + 0.5 - y0 - r) ** 2 + (xx + 0.5 - x0 - r) ** 2 <= r * r] = value
    return np.array([x0, y0, x0 + side, y0 + side], np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A size x size uint8 scene with 1-3 non-overlapping shapes of 20-50 px; (image, boxes (K, 4), labels (K,))."""
    image = _background(rng, size, size)
    boxes, labels = [], []
    wanted = int(rng.integers(1, 4))
    while len(boxes) < wanted:
        side = int(rng.integers(20, 51))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if any(x0 < b[2] and b[0] < x0 + side and y0 < b[3] and b[1] < y0 + side for b in boxes):
            continue
        kind = int(rng.integers(0, 2))
        boxes.append(_draw(image, kind, x0, y0, side, rng.uniform(0.65, 0.95)))
        labels.append(kind)
    return _to_uint8(image), np.stack(boxes), np.array(labels, np.int64)


def _scenes(seed: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images, boxes, labels = zip(*(_scene(rng) for _ in range(count)), strict=True)
    return list(images), list(boxes), list(labels)


@pytest.fixture(scope="module")
def train_scenes():
    return _scenes(seed=1, count=60)


@pytest.fixture(scope="module")
def test_scenes():
    return _scenes(seed=2, count=20)


@pytest.fixture(scope="module")
def detector(train_scenes) -> HogSvmDetector:
    return HogSvmDetector(num_classes=2, seed=0).fit(*train_scenes)


def _map50(predictions: list[dict[str, np.ndarray]], boxes: list[np.ndarray], labels: list[np.ndarray]) -> float:
    metric = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5])
    metric.update(
        [{key: torch.from_numpy(value) for key, value in p.items()} for p in predictions],
        [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab)} for b, lab in zip(boxes, labels, strict=True)],
    )
    return float(metric.compute()["map"])


def test_detects_held_out_scenes_and_predicts_fast(detector, test_scenes):
    images, boxes, labels = test_scenes
    start = time.perf_counter()
    predictions = detector.predict(images)
    seconds = time.perf_counter() - start
    map50 = _map50(predictions, boxes, labels)
    assert map50 > 0.5, f"mAP@0.5 {map50:.3f}"
    assert seconds < 3.0, f"predicting 20 images of 128x128 took {seconds:.2f} s"  # a loose guard, not a benchmark


def test_output_format(detector, test_scenes):
    images = test_scenes[0][:3] + [np.stack([test_scenes[0][3]] * 3, axis=-1)]  # also an RGB image
    for image, prediction in zip(images, detector.predict(images), strict=True):
        boxes, scores, labels = prediction["boxes"], prediction["scores"], prediction["labels"]
        assert set(prediction) == {"boxes", "scores", "labels"}
        assert boxes.dtype == np.float32 and scores.dtype == np.float32 and labels.dtype == np.int64
        assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
        assert 1 <= len(scores) <= detector.config.max_detections
        assert np.all(np.diff(scores) <= 0), "best first"
        assert set(labels.tolist()) <= {SQUARE, DISC}
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
        assert (
            boxes.min() >= 0
            and np.all(boxes[:, [0, 2]] <= image.shape[1])
            and np.all(boxes[:, [1, 3]] <= image.shape[0])
        )


@pytest.mark.parametrize(
    ("height", "width", "kind", "x0", "y0", "side"), [(96, 160, DISC, 112, 40, 36), (200, 120, SQUARE, 70, 140, 44)]
)
def test_boxes_are_in_the_images_own_pixels(detector, height, width, kind, x0, y0, side):
    """Non-square images of other sizes, the object off-centre, so swapped axes or scale factors would miss it."""
    image = _background(np.random.default_rng(3), height, width)
    truth = _draw(image, kind, x0, y0, side, 0.85)
    prediction = detector.predict([_to_uint8(image)])[0]
    iou = box_iou(torch.from_numpy(prediction["boxes"][:1]), torch.from_numpy(truth[None]))
    assert float(iou) > 0.5, f"best box {prediction['boxes'][0]} vs truth {truth}"
    assert prediction["labels"][0] == kind


def test_empty_image_gives_few_low_scores(detector):
    rng = np.random.default_rng(4)
    predictions = detector.predict([_to_uint8(_background(rng, 128, 128)) for _ in range(5)])
    confident = sum(int((p["scores"] > 0).sum()) for p in predictions)  # 0 = the SVM's decision boundary
    assert confident <= 1, [p["scores"][:5] for p in predictions]
    for p in predictions:  # an empty prediction still has the documented shapes and dtypes
        assert p["boxes"].shape == (len(p["scores"]), 4) and p["boxes"].dtype == np.float32
        assert p["scores"].dtype == np.float32 and p["labels"].dtype == np.int64


def test_deterministic_for_a_seed():
    images, boxes, labels = _scenes(seed=5, count=10)
    config = HogConfig(scales=(1.0, 0.64), hard_negative_rounds=1)
    first = HogSvmDetector(2, config, seed=7).fit(images, boxes, labels).predict(images[:3])
    second = HogSvmDetector(2, config, seed=7).fit(images, boxes, labels).predict(images[:3])
    for a, b in zip(first, second, strict=True):
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(a[key], b[key])


def test_sliding_windows_see_what_training_crops_see():
    """A ground-truth box that sits exactly on a window at scale 1 gives the same HOG vector both ways, so the
    SVM is trained on the features it will be asked to score (this also pins the block order of the slices)."""
    image, _, _ = _scene(np.random.default_rng(6))
    gray = _to_gray(image)
    config = HogConfig(scales=(1.0,))
    features, windows = _windows(gray, config)
    index = int(np.flatnonzero((windows[:, 0] == 40) & (windows[:, 1] == 48))[0])  # an interior window
    box = np.array([44, 52, 68, 76], np.float32)  # its central 24 px = OBJECT_FRACTION of 32
    crop_features, mirrored = _positive_features(gray, box, config)
    np.testing.assert_allclose(crop_features, features[index], atol=1e-5)
    margin = 4 + PAD_CELLS * config.cell  # box -> window (32 - 24) / 2 px, window -> crop one cell
    flipped = np.ascontiguousarray(gray[52 - margin : 76 + margin, 44 - margin : 68 + margin][:, ::-1])
    np.testing.assert_allclose(mirrored, _hog_grid(flipped, config)[1:4, 1:4].ravel(), atol=1e-5)


def test_finer_stride_than_a_cell_gives_more_windows():
    gray = _to_gray(_scene(np.random.default_rng(7))[0])
    coarse, _ = _windows(gray, HogConfig(scales=(1.0,)))
    fine, fine_windows = _windows(gray, HogConfig(scales=(1.0,), stride=4))
    assert len(fine) > 3 * len(coarse)
    assert set(np.unique(fine_windows[:, 0] % 8).tolist()) == {0.0, 4.0}


def test_bad_input_is_named():
    with pytest.raises(InputError, match="stride"):
        HogConfig(stride=6)
    with pytest.raises(InputError, match="labels outside"):
        HogSvmDetector(2).fit([np.zeros((64, 64), np.uint8)], [np.array([[0, 0, 30, 30]])], [np.array([2])])
    with pytest.raises(InputError, match="no objects"):
        HogSvmDetector(2).fit([np.zeros((64, 64), np.uint8)], [np.zeros((0, 4))], [np.zeros(0, np.int64)])
