"""An FCOS object detector on a registered backbone: stages -> feature pyramid -> torchvision's FCOS head.

torchvision supplies the parts the field trusts (the FCOS head with its centre-sampling target
assignment, sigmoid focal + GIoU + centre-ness losses, `batched_nms` in post-processing); layerwise
supplies the backbone (the same ResNet stages the classifier uses, so `--init` and per-layer probes
work on it) and the pyramid over its last stages.

Inputs are images already letterboxed to `side` x `side` and normalised by the task's front end, so
torchvision's own normalisation is the identity and training never resizes. At inference (eval mode) the
images are resized to `inference_side` first, which the detect task chooses on validation data after
training (`inference_sides`); boxes come back in the `side` x `side` input's pixels either way.
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
    """

    def __init__(
        self, backbone: PyramidBackbone, num_classes: int, side: int, anchor_sizes: tuple[int, ...], head_convs: int,
        inference_side: int | None = None,
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

    @property
    def inference_side(self) -> int:
        return self.fcos.transform.max_size

    def set_inference_side(self, inference_side: int) -> None:
        """Resize the side x side inputs to `inference_side` x `inference_side` before detecting (eval mode only;
        the boxes are mapped back to the inputs' pixels)."""
        self.fcos.transform.min_size, self.fcos.transform.max_size = (inference_side,), inference_side

    def inference_input(self, images: torch.Tensor) -> torch.Tensor:
        """Letterboxed images (B, 3, side, side) as the eval-mode transform resizes them for the backbone
        (bilinear, as torchvision's `_resize_image_and_masks`)."""
        if self.inference_side == self.side:
            return images
        size = (self.inference_side, self.inference_side)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

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
        return self.fcos(list(images), targets)

    def loss_and_detections(
        self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """FCOS's loss dict and its detections from one pass, for validation. torchvision's FCOS returns the loss
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
    for every one of the N locations of the pyramid levels (finest first), before the score threshold, the
    per-level top-k and non-maximum suppression that `Detector.forward` applies (torchvision's FCOS).

    The same arithmetic as FCOS's own forward and `postprocess_detections`, without their data-dependent
    steps (which a fixed ONNX graph cannot express and a user does better in numpy): the images are padded
    to FCOS's size multiple, the anchors of a fixed side are computed once, and
    score = sqrt(sigmoid(class logit) * sigmoid(centerness)).
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        from torchvision.models.detection.image_list import ImageList

        self.detector, self.side = detector, detector.side
        fcos = detector.fcos
        inference = detector.inference_side  # the side the backbone sees (see `Detector.inference_input`)
        divisible = fcos.transform.size_divisible
        padded = -(-inference // divisible) * divisible
        self.pad = padded - inference
        self.to_input_pixels = self.side / inference
        with torch.no_grad():
            blank = torch.zeros(1, 3, padded, padded)
            features = list(fcos.backbone(blank).values())
            anchors = fcos.anchor_generator(ImageList(blank, [(inference, inference)]), features)[0]
        self.register_buffer("anchors", anchors, persistent=False)  # (N, 4)
        self.level_sizes = [f.shape[2] * f.shape[3] for f in features]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fcos = self.detector.fcos
        resized = F.pad(self.detector.inference_input(images), (0, self.pad, 0, self.pad))
        out = fcos.head(list(fcos.backbone(resized).values()))
        boxes = fcos.box_coder.decode(out["bbox_regression"], self.anchors) * self.to_input_pixels
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        return boxes.clamp(0, self.side), scores


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


def build_detector(
    backbone_name: str, num_classes: int, side: int, head_convs: int, head_levels: int, width: int = 64,
    inference_side: int | None = None,
) -> Detector:  # fmt: skip
    """A detector on a registered ResNet backbone (RGB input, stride-2 stem) with pyramid levels at strides 8-32,
    the first `head_levels` of them with the head."""
    classifier = create_model(backbone_name, in_channels=3, num_classes=1, stem_stride=2)
    names = [name for name, _ in classifier.named_stages()]
    levels = tuple(names[-2:])  # the last two stages: strides 8 and 16 (+ a pooled level at 32)
    channels = tuple(stage[-1].conv2.out_channels for name, stage in classifier.named_stages() if name in levels)
    backbone = PyramidBackbone(classifier.stages, levels, channels, width, head_levels)
    anchor_sizes = ANCHOR_SIZES[:head_levels]
    return Detector(backbone, num_classes, side, anchor_sizes, head_convs, inference_side)


# Convolutions per head branch when a model config does not say: two, what detect runs saved before the config
# held `head_convs` have, so they load as they were. New detect runs ask for the task's HEAD_CONVS (one).
SAVED_HEAD_CONVS = 2
# Pyramid levels with the head when a model config does not say: all three, as runs saved before the config held
# `head_levels` have. New detect runs ask for `head_levels_for` their training objects.
SAVED_HEAD_LEVELS = len(ANCHOR_SIZES)


@register_model("fcos_resnet_s", modalities=("image",), tasks=("detect",))
def fcos_resnet_s(
    num_classes: int, side: int, head_convs: int = SAVED_HEAD_CONVS, head_levels: int = SAVED_HEAD_LEVELS,
    inference_side: int | None = None,
) -> Detector:  # fmt: skip
    return build_detector("resnet_s", num_classes, side, head_convs, head_levels, inference_side=inference_side)


@register_model("fcos_resnet_m", modalities=("image",), tasks=("detect",))
def fcos_resnet_m(
    num_classes: int, side: int, head_convs: int = SAVED_HEAD_CONVS, head_levels: int = SAVED_HEAD_LEVELS,
    inference_side: int | None = None,
) -> Detector:  # fmt: skip
    return build_detector(
        "resnet_m", num_classes, side, head_convs, head_levels, width=96, inference_side=inference_side
    )
