"""The classical object detector that deep learning replaced, kept as an honest baseline for ``detect``.

HOG features + a linear SVM over sliding windows at a few scales, then non-maximum suppression
(Dalal & Triggs, "Histograms of oriented gradients for human detection", CVPR 2005). A detection
network is only worth its cost if it beats this, so both are scored with the same mAP code: ``predict``
returns torchmetrics' ``MeanAveragePrecision`` format.

How it works:

- Every window is square, ``window`` pixels at the rescaled resolution, and an object's longer side
  fills ``OBJECT_FRACTION`` of it (the rest is context, which Dalal & Triggs found matters).
- Positives: each ground-truth box, cropped square around its centre (so its aspect is kept), resized
  into the window, plus its horizontal mirror. Negatives: random sliding windows whose object box has
  IoU < 0.3 with every object, then ``hard_negative_rounds`` rounds of mining the training images for
  background windows the SVM still scores above its margin, and refitting.
- One one-vs-rest ``LinearSVC`` over ``num_classes`` object classes plus a background class.
- Detection: for each scale the image is rescaled, HOG is computed once as a block grid
  (``hog(..., feature_vector=False)``) and every window is a slice of that grid, so a 128x128 image
  costs a few HOG passes rather than thousands.
- A window predicts a box of ``OBJECT_FRACTION`` of its side around its centre, shaped to the median
  aspect ratio of the class in training (the detector has no box regression). Scores are SVM decision
  values; windows below ``SCORE_FLOOR`` are dropped, then per-class NMS keeps ``max_detections``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from skimage.color import rgb2gray
from skimage.feature import hog
from skimage.transform import resize
from sklearn.svm import LinearSVC
from torchvision.ops import batched_nms, box_iou

from layerwise.errors import InputError

OBJECT_FRACTION = 0.75  # an object's longer side over the window side: 24 px of a 32 px window
NEGATIVE_MAX_IOU = 0.3  # a window is background when its box overlaps every object less than this
SCORE_FLOOR = -1.0  # the SVM margin: background windows were trained to score at or below -1
SVM_C = 0.01  # Dalal & Triggs' soft-margin constant for HOG; HOG blocks are L2-Hys normalised
SVM_MAX_ITER = 5000
HARD_NEGATIVES_PER_NEGATIVE = 5  # per image and round, mine up to 5 x negatives_per_image false positives
PAD_CELLS = 1  # cells of edge-replicated border so objects touching the image edge still get a window


@dataclass(frozen=True)
class HogConfig:
    """Window geometry (pixels at the rescaled resolution), HOG layout and the training schedule.

    ``scales`` are image rescale factors. At scale ``s`` a window sees an object of about
    ``OBJECT_FRACTION * window / s`` original pixels, so the default 1.25..0.4 (steps of 1.25x) covers
    objects of 19-60 px, 15%-47% of a 128 px image, and half a step either side of that.
    """

    window: int = 32  # square window side in pixels at scale 1 (objects are resized into it)
    cell: int = 8  # HOG cell side, pixels
    block: int = 2  # HOG block side, cells
    orientations: int = 9  # unsigned gradient orientation bins over 0-180 degrees
    scales: tuple[float, ...] = (1.25, 1.0, 0.8, 0.64, 0.5, 0.4)
    stride: int = 8  # window step in pixels; a multiple of cell, or a divisor of it (then HOG runs per offset)
    negatives_per_image: int = 20
    hard_negative_rounds: int = 1  # mine false positives on training images this many times and refit
    nms_iou: float = 0.3
    max_detections: int = 50

    def __post_init__(self) -> None:
        if self.cell < 1 or self.window % self.cell != 0:
            raise InputError(f"HogConfig: window ({self.window}) must be a positive multiple of cell ({self.cell})")
        if not 1 <= self.block <= self.window // self.cell:
            raise InputError(
                f"HogConfig: block ({self.block} cells) must fit in the window ({self.window // self.cell} cells)"
            )
        if self.orientations < 1:
            raise InputError(f"HogConfig: orientations must be at least 1, got {self.orientations}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise InputError(f"HogConfig: scales must be a non-empty tuple of positive factors, got {self.scales}")
        if self.stride < 1 or (self.stride % self.cell != 0 and self.cell % self.stride != 0):
            raise InputError(f"HogConfig: stride ({self.stride}) must be a multiple or a divisor of cell ({self.cell})")
        if self.negatives_per_image < 0 or self.hard_negative_rounds < 0:
            raise InputError("HogConfig: negatives_per_image and hard_negative_rounds must be >= 0")
        if not 0 < self.nms_iou <= 1 or self.max_detections < 1:
            raise InputError("HogConfig: nms_iou must be in (0, 1] and max_detections at least 1")

    @property
    def blocks_per_window(self) -> int:
        return self.window // self.cell - self.block + 1


def _to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) image, uint8 0-255 or float 0-1 -> (H, W) float32 gray in 0-1."""
    if image.ndim == 3:
        image = image[..., 0] if image.shape[2] == 1 else rgb2gray(image[..., :3])
    elif image.ndim != 2:
        raise InputError(f"HogSvmDetector: an image must be (H, W) or (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


def _hog_grid(gray: np.ndarray, config: HogConfig) -> np.ndarray:
    """(H, W) gray -> (By, Bx, block, block, orientations) L2-Hys normalised HOG blocks."""
    return hog(
        gray,
        orientations=config.orientations,
        pixels_per_cell=(config.cell, config.cell),
        cells_per_block=(config.block, config.block),
        block_norm="L2-Hys",
        feature_vector=False,
    ).astype(np.float32)


def _resize(gray: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # Gaussian anti-aliasing only when shrinking, as Dalal & Triggs' pyramid; crops and pyramid use the same call.
    shrinking = shape[0] < gray.shape[0] or shape[1] < gray.shape[1]
    return resize(gray, shape, order=1, anti_aliasing=shrinking, preserve_range=True).astype(np.float32)


def _windows(gray: np.ndarray, config: HogConfig) -> tuple[np.ndarray, np.ndarray]:
    """All sliding windows of an image at every scale.

    Returns features (N, D) float32 and the windows as (N, 4) float32 xyxy boxes in the image's own
    pixels (a window is square at its scale, so only rounding of the rescaled size makes it not square).
    """
    height, width = gray.shape
    nb, pad = config.blocks_per_window, PAD_CELLS * config.cell
    step = max(config.stride // config.cell, 1)  # in cells
    offsets = range(0, config.cell, config.stride) if config.stride < config.cell else range(1)
    features, windows = [], []
    for scale in config.scales:
        h, w = max(round(height * scale), 1), max(round(width * scale), 1)
        sy, sx = h / height, w / width  # rescaled pixels per original pixel, per axis after rounding
        padded = np.pad(_resize(gray, (h, w)), pad, mode="edge")
        for oy in offsets:
            for ox in offsets:
                sub = padded[oy:, ox:]
                if min(sub.shape) < config.window:
                    continue
                grid = _hog_grid(sub, config)  # (By, Bx, b, b, o)
                view = sliding_window_view(grid, (nb, nb), axis=(0, 1))[::step, ::step]  # (R, C, b, b, o, nb, nb)
                rows, cols = view.shape[:2]
                # (R, C, nb, nb, b, b, o): the same order as a window's own block grid raveled.
                features.append(view.transpose(0, 1, 5, 6, 2, 3, 4).reshape(rows * cols, -1))
                r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
                y0 = (r.ravel() * step * config.cell + oy - pad) / sy
                x0 = (c.ravel() * step * config.cell + ox - pad) / sx
                y1, x1 = y0 + config.window / sy, x0 + config.window / sx
                windows.append(np.stack([x0, y0, x1, y1], axis=1).astype(np.float32))
    if not features:
        dim = nb * nb * config.block * config.block * config.orientations
        return np.zeros((0, dim), np.float32), np.zeros((0, 4), np.float32)
    return np.concatenate(features), np.concatenate(windows)


def _object_boxes(windows: np.ndarray, aspect: np.ndarray | float) -> np.ndarray:
    """(N, 4) windows -> (N, 4) the object box each predicts: its longer side OBJECT_FRACTION of the window,
    width / height = ``aspect`` (a scalar or (N,)), centred."""
    cx, cy = (windows[:, 0] + windows[:, 2]) / 2, (windows[:, 1] + windows[:, 3]) / 2
    side_x = (windows[:, 2] - windows[:, 0]) * OBJECT_FRACTION
    side_y = (windows[:, 3] - windows[:, 1]) * OBJECT_FRACTION
    aspect = np.broadcast_to(np.asarray(aspect, np.float32), cx.shape)
    half_w = np.where(aspect >= 1, side_x, side_x * aspect) / 2
    half_h = np.where(aspect >= 1, side_y / aspect, side_y) / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1).astype(np.float32)


def _max_iou(boxes: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(N,) the largest IoU of each box with any of the (K, 4) objects; zeros when K = 0."""
    if len(objects) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes), np.float32)
    return box_iou(torch.from_numpy(boxes), torch.from_numpy(objects.astype(np.float32))).amax(dim=1).numpy()


def _crop(gray: np.ndarray, y0: int, x0: int, side: int) -> np.ndarray:
    """The (side, side) square at (y0, x0), edge-replicated where it leaves the image."""
    height, width = gray.shape
    region = gray[max(y0, 0) : min(y0 + side, height), max(x0, 0) : min(x0 + side, width)]
    pads = ((max(-y0, 0), max(y0 + side - height, 0)), (max(-x0, 0), max(x0 + side - width, 0)))
    return np.pad(region, pads, mode="edge")


def _positive_features(gray: np.ndarray, box: np.ndarray, config: HogConfig) -> list[np.ndarray]:
    """HOG of one object and of its mirror image, each (D,), exactly as a sliding window would see it.

    The crop carries PAD_CELLS of context around the window so gradients at the window's edge see real
    neighbours, then only the window's blocks are kept, the same blocks ``_windows`` slices.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    window_px = max(x1 - x0, y1 - y0) / OBJECT_FRACTION  # window side in original pixels
    context = config.window + 2 * PAD_CELLS * config.cell  # crop side in window pixels
    side = max(round(window_px * context / config.window), 1)
    top, left = round((y0 + y1) / 2 - side / 2), round((x0 + x1) / 2 - side / 2)
    crop = _resize(_crop(gray, top, left, side), (context, context))
    nb = config.blocks_per_window
    return [
        _hog_grid(np.ascontiguousarray(image), config)[PAD_CELLS : PAD_CELLS + nb, PAD_CELLS : PAD_CELLS + nb].ravel()
        for image in (crop, crop[:, ::-1])
    ]


class HogSvmDetector:
    """HOG + linear SVM sliding-window detector; ``fit`` then ``predict``."""

    def __init__(self, num_classes: int, config: HogConfig = HogConfig(), seed: int = 0) -> None:
        if num_classes < 1:
            raise InputError(f"HogSvmDetector: num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.config = config
        self.seed = seed
        self.background = num_classes  # the SVM's extra class label
        self.svm: LinearSVC | None = None
        self.aspect = np.ones(num_classes, np.float32)  # median width / height of each class in training

    def fit(self, images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray]) -> HogSvmDetector:
        """Images uint8 (H, W, 3) or (H, W); boxes float (K, 4) xyxy pixels; labels int (K,) in [0, num_classes)."""
        if not len(images) == len(boxes) == len(labels):
            raise InputError(
                f"HogSvmDetector.fit: {len(images)} images, {len(boxes)} box sets, {len(labels)} label sets"
            )
        rng = np.random.default_rng(self.seed)
        grays = [_to_gray(image) for image in images]
        objects = [self._check_targets(i, b, lab) for i, (b, lab) in enumerate(zip(boxes, labels, strict=True))]

        pos_x, pos_y = [], []
        for gray, (obj_boxes, obj_labels) in zip(grays, objects, strict=True):
            for box, label in zip(obj_boxes, obj_labels, strict=True):
                if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                    pos_x += _positive_features(gray, box, self.config)
                    pos_y += [int(label)] * 2
        if not pos_x:
            raise InputError("HogSvmDetector.fit: the training images hold no objects to learn from")
        all_boxes = np.concatenate([b for b, _ in objects])
        all_labels = np.concatenate([lab for _, lab in objects])
        widths, heights = all_boxes[:, 2] - all_boxes[:, 0], all_boxes[:, 3] - all_boxes[:, 1]
        for k in range(self.num_classes):
            keep = (all_labels == k) & (heights > 0)
            if keep.any():
                self.aspect[k] = float(np.median(widths[keep] / heights[keep]))

        neg_x = []
        for gray, (obj_boxes, _) in zip(grays, objects, strict=True):
            feats, wins = _windows(gray, self.config)
            candidates = np.flatnonzero(_max_iou(_object_boxes(wins, 1.0), obj_boxes) < NEGATIVE_MAX_IOU)
            take = min(self.config.negatives_per_image, len(candidates))
            neg_x.append(feats[rng.choice(candidates, size=take, replace=False)])
        self._fit_svm(pos_x, pos_y, neg_x)

        for _ in range(self.config.hard_negative_rounds):
            cap = HARD_NEGATIVES_PER_NEGATIVE * max(self.config.negatives_per_image, 1)
            for gray, (obj_boxes, _) in zip(grays, objects, strict=True):
                feats, wins = _windows(gray, self.config)
                best = self._class_scores(feats).max(axis=1)
                background = _max_iou(_object_boxes(wins, 1.0), obj_boxes) < NEGATIVE_MAX_IOU
                hard = np.flatnonzero(background & (best > SCORE_FLOOR))
                neg_x.append(feats[hard[np.argsort(-best[hard], kind="stable")[:cap]]])
            self._fit_svm(pos_x, pos_y, neg_x)
        return self

    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per image {"boxes": float32 (M, 4) xyxy in the image's own pixels, "scores": float32 (M,) SVM
        decision values, higher = more confident, "labels": int64 (M,)}, best first, M <= max_detections."""
        if self.svm is None:
            raise InputError("HogSvmDetector.predict: call fit first")
        return [self._predict_one(_to_gray(image)) for image in images]

    def _predict_one(self, gray: np.ndarray) -> dict[str, np.ndarray]:
        feats, wins = _windows(gray, self.config)
        scores = self._class_scores(feats)  # (N, num_classes)
        index, label = np.nonzero(scores > SCORE_FLOOR)
        boxes = _object_boxes(wins[index], self.aspect[label])
        height, width = gray.shape
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        box_t, score_t = torch.from_numpy(boxes), torch.from_numpy(scores[index, label].astype(np.float32))
        label_t = torch.from_numpy(label.astype(np.int64))
        keep = batched_nms(box_t, score_t, label_t, self.config.nms_iou)[: self.config.max_detections]
        return {"boxes": box_t[keep].numpy(), "scores": score_t[keep].numpy(), "labels": label_t[keep].numpy()}

    def _class_scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, num_classes) float32 SVM decision values; -inf for a class unseen in training."""
        assert self.svm is not None
        scores = np.full((len(features), self.num_classes), -np.inf, np.float32)
        if len(features) == 0:
            return scores
        decision = self.svm.decision_function(features)
        if decision.ndim == 1:  # two classes: sklearn gives one column, positive for classes_[1]
            decision = np.stack([-decision, decision], axis=1)
        for column, cls in enumerate(self.svm.classes_):
            if cls != self.background:
                scores[:, cls] = decision[:, column]
        return scores

    def _fit_svm(self, pos_x: list[np.ndarray], pos_y: list[int], neg_x: list[np.ndarray]) -> None:
        negatives = np.concatenate(neg_x) if neg_x else np.zeros((0, len(pos_x[0])), np.float32)
        x = np.concatenate([np.stack(pos_x), negatives])
        y = np.concatenate([np.asarray(pos_y, np.int64), np.full(len(negatives), self.background, np.int64)])
        if len(np.unique(y)) < 2:
            raise InputError("HogSvmDetector.fit: need background windows as well as objects to learn from")
        self.svm = LinearSVC(C=SVM_C, max_iter=SVM_MAX_ITER, random_state=self.seed).fit(x, y)

    def _check_targets(self, index: int, boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise InputError(f"HogSvmDetector.fit: image {index} has {len(boxes)} boxes but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(f"HogSvmDetector.fit: image {index} has labels outside [0, {self.num_classes})")
        return boxes, labels
