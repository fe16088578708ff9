"""An FCOS object detector on a registered backbone: stages -> feature pyramid -> torchvision's FCOS head.

torchvision supplies the parts the field trusts (the FCOS head with its centre-sampling target
assignment, sigmoid focal + GIoU + centre-ness losses, `batched_nms` in post-processing); layerwise
supplies the backbone (the same ResNet stages the classifier uses, so `--init` and per-layer probes
work on it) and the pyramid over its last stages.

Inputs are images already letterboxed to `side` x `side` and normalised by the task's front end, so
torchvision's own normalisation is the identity and training never resizes. At inference (eval mode) the
images are resized to `inference_side` first, which the detect task chooses on validation data after
training (`inference_sides`); boxes come back in the `side` x `side` input's pixels either way. The task may
also choose test-time views (`inference_views`): the image at two sides and mirrored, each view's candidate
boxes mapped back to the input's pixels and put through one non-maximum suppression.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from layerwise.models.registry import create_model, register_model
from layerwise.runtime import channels_last_for

# FCOS's anchor size per pyramid level, finest first: each level's stride (8, 16, 32 on a stride-4 backbone).
ANCHOR_SIZES = (8, 16, 32)
# FCOS's centre sampling: a location is a positive for an object when it lies within this many strides of the
# object's centre (torchvision's default).
CENTER_SAMPLING_RADIUS = 1.5
# The inference side tried on validation after training beside the training side, as a multiple of it. 1.25 scored
# higher mAP@0.5 than 1.0 on the validation split for all six 5-minute detectors trained on the demo scenes (+0.004
# to +0.014) and on their held-out test scenes (+0.009 to +0.018; the thin boxes of trousers and sneakers are placed
# better on a finer grid); 1.5 lost 0.06-0.08 on test (objects then outgrow the head's pyramid levels).
LARGER_INFERENCE_SCALE = 1.25
# A view the detector sees an image in at inference: (the side the backbone sees, mirrored left to right).
View = tuple[int, bool]


class PyramidBackbone(nn.Module):
    """Backbone stages -> an FPN over the chosen stages (plus one max-pooled level), `out_channels` each; the
    first `head_levels` of its levels (finest first) are what it returns, the levels the head predicts on."""

    def __init__(
        self, stages: nn.Sequential, levels: tuple[str, ...], in_channels: tuple[int, ...], width: int,
        head_levels: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stages = stages  # named like a classifier's `stages`, so classifier weights transfer by name
        self.levels = levels
        # The pooled level only where the head uses it; the FPN's weights are the same either way.
        pooled = LastLevelMaxPool() if head_levels > len(levels) else None
        self.fpn = FeaturePyramidNetwork(list(in_channels), width, extra_blocks=pooled)
        self.head_levels = head_levels
        self.out_channels = width

    def stage_outputs(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if channels_last_for(self, x.device):
            # FCOS's transform batches the images into a new NCHW tensor. NHWC measured 206 against 176 images/s
            # at batch 32 on the CPU where the weights are NCHW (a loaded run); training, whose loop makes the
            # weights NHWC, runs NHWC either way.
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = OrderedDict()
        for name, stage in self.stages.named_children():
            x = stage(x)
            if name in self.levels:
                outputs[name] = x
        return outputs

    def pyramid(self, stage_outputs: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The FPN's levels the head predicts on, finest first, from `stage_outputs`."""
        levels = self.fpn(stage_outputs)  # strides e.g. 8, 16, 32 for a stride-2 stem + max-pool
        return OrderedDict(list(levels.items())[: self.head_levels])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.stage_outputs(x))


class Detector(nn.Module):
    """`forward(images)` -> detections (eval) or the loss dict (train, with `targets`).

    images: float (B, 3, side, side), normalised; targets: per image {"boxes": (K, 4) xyxy px, "labels": (K,)}.
    Detections: per image {"boxes": (M, 4) xyxy px in the letterboxed image, "scores": (M,), "labels": (M,)}.
    In eval mode the images (and the targets of `loss_and_detections`) are resized to `inference_side` first;
    validation during training runs at `side`, the inference side until the task chooses one after training.
    With `inference_views` set, eval mode detects in each view and merges them (`detect_views`).
    """

    def __init__(
        self, backbone: PyramidBackbone, num_classes: int, side: int, anchor_sizes: tuple[int, ...], head_convs: int,
        inference_side: int | None = None, inference_views: list[View] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.side = side
        self.num_classes = num_classes
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
        head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=head_convs)
        # _skip_resize: training batches are already side x side, and torchvision would otherwise interpolate each
        # image to the size it has (or, after set_inference_side, to the inference size).
        self.fcos = FCOS(
            backbone, num_classes, min_size=side, max_size=side, image_mean=[0.0] * 3, image_std=[1.0] * 3,
            anchor_generator=anchors, head=head, center_sampling_radius=CENTER_SAMPLING_RADIUS, score_thresh=0.05,
            nms_thresh=0.5, detections_per_img=100, _skip_resize=True,
        )  # fmt: skip
        self.set_inference_side(inference_side or side)
        self.set_inference_views(inference_views)

    @property
    def inference_side(self) -> int:
        return self.fcos.transform.max_size

    @property
    def inference_views(self) -> tuple[View, ...]:
        """The views eval mode detects in: the test-time views when set, else the image at `inference_side`."""
        return self._views or ((self.inference_side, False),)

    def set_inference_views(self, views: list[View] | None) -> None:
        """Detect in each of `views` and merge them (`detect_views`); None: one pass at `inference_side`."""
        if views is not None:
            views = tuple((int(view_side), bool(mirrored)) for view_side, mirrored in views)
            if not views or any(view_side < 32 or view_side % 32 for view_side, _ in views):
                raise ValueError(f"inference views must be (side, mirrored) pairs, sides multiples of 32: {views}")
        self._views = views

    def set_inference_side(self, inference_side: int) -> None:
        """Detect in one pass, the side x side inputs resized to `inference_side` x `inference_side` first (eval
        mode only; the boxes are mapped back to the inputs' pixels). Clears any test-time views."""
        self.fcos.transform.min_size, self.fcos.transform.max_size = (inference_side,), inference_side
        self._views = None

    @property
    def backbone(self) -> PyramidBackbone:
        return self.fcos.backbone

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        return list(self.backbone.stages.named_children())

    def forward_features(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The multi-scale features (B, out_channels, H/s, W/s) per pyramid level the head predicts on."""
        return self.backbone(x)

    def forward_head(self, features: OrderedDict[str, torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """pre_logits: the head's coarsest level averaged to (B, out_channels), an embedding of the whole image;
        otherwise the head's per-location class logits (B, locations, num_classes)."""
        if pre_logits:
            return list(features.values())[-1].mean(dim=(2, 3))
        return self.fcos.head(list(features.values()))["cls_logits"]

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if self._views is not None and not self.training:
            return self.detect_views(images, self._views)
        return self.fcos(list(images), targets)

    def view_input(self, images: torch.Tensor, view: View) -> torch.Tensor:
        """Letterboxed images (B, 3, side, side) as the backbone sees them in `view`: mirrored and resized
        (bilinear, as torchvision's transform). Sides are multiples of 32, FCOS's size multiple: no padding."""
        if images.shape[-2:] != (self.side, self.side):
            raise ValueError(f"the detector takes letterboxed {self.side} x {self.side} images, not {images.shape}")
        view_side, mirrored = view
        x = images.flip(-1) if mirrored else images
        if view_side != self.side:
            x = F.interpolate(x, size=(view_side, view_side), mode="bilinear", align_corners=False)
        return x

    def view_anchors(self, view: View, view_images: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """FCOS's anchors (N, 4) for `view_input`'s images, in the input images' pixels: scaled back and, for a
        mirrored view, mirrored back. Decode a mirrored view's regression with its left and right distances
        swapped (`view_regression`): FCOS's box is the anchor's centre minus/plus them times its size."""
        from torchvision.models.detection.image_list import ImageList

        view_side, mirrored = view
        sizes = [(view_side, view_side)] * len(view_images)
        anchors = self.fcos.anchor_generator(ImageList(view_images, sizes), features)[0] * (self.side / view_side)
        if mirrored:
            x0, y0, x1, y1 = anchors.unbind(1)
            anchors = torch.stack([self.side - x1, y0, self.side - x0, y1], 1)
        return anchors

    @staticmethod
    def view_regression(view: View, regression: torch.Tensor) -> torch.Tensor:
        """FCOS's (left, top, right, bottom) distances of a view, as the input images' anchors take them."""
        return regression[..., [2, 1, 0, 3]] if view[1] else regression

    def detect_views(self, images: torch.Tensor, views: tuple[View, ...]) -> list[dict[str, torch.Tensor]]:
        """Detections (as eval-mode `forward`) from every view of the images at once: each view's locations are
        more pyramid levels to FCOS's post-processing (score threshold, top-k per level), and one non-maximum
        suppression merges what the views found: test-time augmentation at the level of candidates, as YOLOv5's
        `--augment` does. The detect task chooses the views on validation data (`DetectTask.final_metrics`)."""
        fcos = self.fcos
        outputs: dict[str, list[torch.Tensor]] = {"cls_logits": [], "bbox_regression": [], "bbox_ctrness": []}
        anchors: list[torch.Tensor] = []
        for view in views:
            view_images = self.view_input(images, view)
            features = list(fcos.backbone(view_images).values())
            head = fcos.head(features)
            head["bbox_regression"] = self.view_regression(view, head["bbox_regression"])
            per_level = [f.size(2) * f.size(3) for f in features]
            for key in outputs:
                outputs[key] += head[key].split(per_level, dim=1)
            anchors += self.view_anchors(view, view_images, features).split(per_level)
        return fcos.postprocess_detections(outputs, [anchors] * len(images), [(self.side, self.side)] * len(images))

    def loss_and_detections(
        self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """FCOS's loss dict and its detections from one pass at `inference_side`, for validation during training
        (test-time views are chosen after it and not used here). torchvision's FCOS returns the loss
        only in train mode and detections only in eval mode, and two passes cost validation twice the time; these
        are the steps of its `forward`, both branches taken. Call in eval mode (BatchNorm on its running stats)."""
        fcos = self.fcos
        batch, targets = fcos.transform(list(images), targets)
        features = list(fcos.backbone(batch.tensors).values())
        outputs = fcos.head(features)
        anchors = fcos.anchor_generator(batch, features)
        per_level = [f.size(2) * f.size(3) for f in features]
        losses = fcos.compute_loss(targets, outputs, anchors, per_level)
        split_outputs = {key: list(value.split(per_level, dim=1)) for key, value in outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = fcos.postprocess_detections(split_outputs, split_anchors, batch.image_sizes)
        sizes = [tuple(image.shape[-2:]) for image in images]
        return losses, fcos.transform.postprocess(detections, batch.image_sizes, sizes)


class DenseDetections(nn.Module):
    """What `layerwise export` writes for a detector: images (B, 3, side, side), letterboxed and normalised ->
    boxes (B, N, 4) x0 y0 x1 y1 in the letterboxed image's pixels, clipped to it, and scores (B, N, classes),
    for every one of the N locations of the pyramid levels (finest first) of each of the detector's
    `inference_views` in turn, before the score threshold, the per-level top-k and non-maximum suppression that
    `Detector.forward` applies (torchvision's FCOS, over the locations of all views at once).

    The same arithmetic as FCOS's own forward and `postprocess_detections`, without their data-dependent
    steps (which a fixed ONNX graph cannot express and a user does better in numpy): each view's images are
    mirrored and resized as `Detector.view_input` does, the anchors of a fixed side are computed once,
    and score = sqrt(sigmoid(class logit) * sigmoid(centerness)).
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector, self.side = detector, detector.side
        self.views = detector.inference_views
        self.level_sizes: list[int] = []  # locations per pyramid level, the views' levels one after another
        with torch.no_grad():
            for index, view in enumerate(self.views):
                blank = detector.view_input(torch.zeros(1, 3, self.side, self.side), view)
                features = list(detector.fcos.backbone(blank).values())
                anchors = detector.view_anchors(view, blank, features)  # (N, 4) in the input's pixels
                self.register_buffer(f"anchors_{index}", anchors, persistent=False)
                self.level_sizes += [f.shape[2] * f.shape[3] for f in features]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fcos, boxes, scores = self.detector.fcos, [], []
        for index, view in enumerate(self.views):
            out = fcos.head(list(fcos.backbone(self.detector.view_input(images, view)).values()))
            regression = self.detector.view_regression(view, out["bbox_regression"])
            boxes.append(fcos.box_coder.decode(regression, getattr(self, f"anchors_{index}")))
            scores.append(torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"])))
        return torch.cat(boxes, 1).clamp(0, self.side), torch.cat(scores, 1)


def head_levels_for(longest_side: float) -> int:
    """The pyramid levels (finest first) the head needs for objects whose longer side is at most `longest_side`
    pixels in the letterboxed images, scale augmentation included.

    FCOS makes a location a positive of a level when it lies within CENTER_SAMPLING_RADIUS anchor sizes of the
    object's centre and its distance to the object's farthest side is 4 to 8 anchor sizes (no lower limit on
    the finest level, no upper one on the coarsest). That distance is at most half the object's longer side
    plus the radius, so a level whose 4 anchor sizes exceed it gets no positive, nor do the coarser ones: a
    head there would learn background alone. Such levels cost time in every step (12% of a training step on
    the demo scenes, whose objects, up to 80 px, all go to the finest level) and add false detections."""
    for level, coarser in enumerate(ANCHOR_SIZES[1:]):
        if longest_side / 2 + CENTER_SAMPLING_RADIUS * coarser <= 4 * coarser:  # nothing reaches the next level
            return level + 1
    return len(ANCHOR_SIZES)


def inference_sides(side: int) -> list[int]:
    """The inference sides to try for a detector trained at `side` (a multiple of 32): `side` itself, then the
    multiple of 32 nearest LARGER_INFERENCE_SCALE times it (FCOS pads its inputs to a multiple of 32)."""
    return [side, 32 * math.floor(side * LARGER_INFERENCE_SCALE / 32 + 0.5)]


def test_time_views(sides: list[int]) -> list[tuple[View, ...]]:
    """The test-time views to try for a detector with these inference sides, cheapest first: every side, then
    every side and its mirror image."""
    plain = tuple((side, False) for side in sides)
    return [plain, plain + tuple((side, True) for side in sides)]


def build_detector(
    backbone_name: str, num_classes: int, side: int, head_convs: int, head_levels: int, width: int = 64,
    inference_side: int | None = None, inference_views: list[View] | None = None,
) -> Detector:  # fmt: skip
    """A detector on a registered ResNet backbone (RGB input, stride-2 stem) with pyramid levels at strides 8-32,
    the first `head_levels` of them with the head."""
    classifier = create_model(backbone_name, in_channels=3, num_classes=1, stem_stride=2)
    names = [name for name, _ in classifier.named_stages()]
    levels = tuple(names[-2:])  # the last two stages: strides 8 and 16 (+ a pooled level at 32)
    channels = tuple(stage[-1].conv2.out_channels for name, stage in classifier.named_stages() if name in levels)
    backbone = PyramidBackbone(classifier.stages, levels, channels, width, head_levels)
    anchor_sizes = ANCHOR_SIZES[:head_levels]
    return Detector(backbone, num_classes, side, anchor_sizes, head_convs, inference_side, inference_views)


# Convolutions per head branch when a model config does not say: two, what detect runs saved before the config
# held `head_convs` have, so they load as they were. New detect runs ask for the task's HEAD_CONVS (one).
SAVED_HEAD_CONVS = 2
# Pyramid levels with the head when a model config does not say: all three, as runs saved before the config held
# `head_levels` have. New detect runs ask for `head_levels_for` their training objects.
SAVED_HEAD_LEVELS = len(ANCHOR_SIZES)


@register_model("fcos_resnet_s", modalities=("image",), tasks=("detect",))
def fcos_resnet_s(
    num_classes: int, side: int, head_convs: int = SAVED_HEAD_CONVS, head_levels: int = SAVED_HEAD_LEVELS,
    inference_side: int | None = None, inference_views: list[View] | None = None,
) -> Detector:  # fmt: skip
    return build_detector(
        "resnet_s", num_classes, side, head_convs, head_levels, inference_side=inference_side,
        inference_views=inference_views,
    )  # fmt: skip


@register_model("fcos_resnet_m", modalities=("image",), tasks=("detect",))
def fcos_resnet_m(
    num_classes: int, side: int, head_convs: int = SAVED_HEAD_CONVS, head_levels: int = SAVED_HEAD_LEVELS,
    inference_side: int | None = None, inference_views: list[View] | None = None,
) -> Detector:  # fmt: skip
    return build_detector(
        "resnet_m", num_classes, side, head_convs, head_levels, width=96, inference_side=inference_side,
        inference_views=inference_views,
    )  # fmt: skip
