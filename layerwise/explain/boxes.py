"""`layerwise explain` on a detect run: which pixels drove one detected box (Grad-CAM on the box's score).

The box's score is the head's class evidence for the box's label summed over the pyramid locations
whose centres fall inside the box (where FCOS predicts that box from). Grad-CAM weighs the last
backbone stage's channels by the gradient of that score and keeps the positive part: the picture
shows what made the network say "a sneaker, here".
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from layerwise.data.boxes import letterbox, normalise
from layerwise.data.sources import Problem
from layerwise.errors import DecodeError, InputError
from layerwise.files import write_atomic, write_json
from layerwise.runtime import model_device


def box_score(network, images: torch.Tensor, box: torch.Tensor, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, last backbone stage activations (1, C, h, w) with their gradient kept) for one letterboxed box,
    as the detector sees it at its inference side (`Detector.view_input`; explained in that one view when the run
    also detects in test-time views). Sides are multiples of 32, so the view needs no padding."""
    backbone = network.backbone
    box = box * (network.inference_side / images.shape[-1])
    images = network.view_input(images, (network.inference_side, False))
    stage_outputs = backbone.stage_outputs(images)
    last = list(stage_outputs.values())[-1]
    last.retain_grad()
    pyramid = backbone.pyramid(stage_outputs)
    logits = network.fcos.head(list(pyramid.values()))["cls_logits"][0, :, label]  # (locations,)
    centres = []
    side = images.shape[-1]
    for level in pyramid.values():
        h, w = level.shape[-2:]
        stride = side / w
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres.append(torch.stack([(xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride], 1))
    centres = torch.cat(centres).to(images.device)  # (locations, 2) in the resized image's pixels, as `box`
    x0, y0, x1, y1 = box.tolist()
    inside = (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
    if not inside.any():  # a box smaller than one stride: its nearest location
        middle = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2], device=images.device)
        inside = torch.zeros_like(inside)
        inside[torch.cdist(centres, middle[None]).argmin()] = True
    return torch.sigmoid(logits[inside]).sum(), last


def grad_cam(network, images: torch.Tensor, box: torch.Tensor, label: int) -> np.ndarray:
    """Grad-CAM heat map (side, side) in [0, 1] of one box in a letterboxed, normalised image (1, 3, side, side)."""
    network.eval()
    with torch.enable_grad():
        images = images.detach().requires_grad_(False)
        score, last = box_score(network, images, box, label)
        network.zero_grad(set_to_none=True)
        score.backward()
    weights = last.grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = torch.relu((weights * last).sum(1, keepdim=True))  # (1, 1, h, w)
    cam = torch.nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam.detach().cpu().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def overlay_png(
    pixels: np.ndarray, cam: np.ndarray, box, label: str, confidence: float, crop: tuple[int, int]
) -> bytes:
    """The image (the letterboxed part only) with the heat map blended in and the box outlined."""
    from layerwise.report.detect_sections import draw_boxes

    width, height = crop
    heat = (colormaps["inferno"](cam)[..., :3] * 255).astype(np.float32)
    blended = (0.55 * pixels.transpose(1, 2, 0).astype(np.float32) + 0.45 * heat).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(blended[:height, :width])
    image = draw_boxes(image, [box], [label], [confidence])
    scale = max(1, 384 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def explain_boxes(bundle, inputs: list[str | Path], out_dir: Path, box_rank: int = 1) -> tuple[dict, list[Problem]]:
    """For each image, Grad-CAM of its `box_rank`-th most confident box; pictures and explanations.json in out_dir."""
    task, network = bundle.task, bundle.network
    if box_rank < 1:
        raise InputError(f"--box must be 1 or more, not {box_rank}")
    out_dir.mkdir(parents=True, exist_ok=True)
    detections, problems = task.detect(network, inputs, threshold=0.0)
    records = []
    for detection in detections:
        if len(detection.boxes) < box_rank:
            problems.append(Problem(detection.path, f"only {len(detection.boxes)} box(es) detected, no box {box_rank}"))
            continue
        chosen = detection.boxes[box_rank - 1]
        try:
            pixels, scale, _ = letterbox(Path(detection.path), task.prep.side)
        except DecodeError as err:
            problems.append(Problem(detection.path, str(err)))
            continue
        images = normalise(torch.from_numpy(pixels)[None], task.prep.mean, task.prep.std).to(model_device(network))
        letterboxed_box = torch.tensor(chosen.box) * scale
        cam = grad_cam(network, images, letterboxed_box, task.class_names.index(chosen.label))
        crop = (round(detection.width * scale), round(detection.height * scale))
        name = f"{len(records):04d}_{Path(detection.path).stem}_box{box_rank}.png"
        write_atomic(out_dir / name, overlay_png(pixels, cam, letterboxed_box, chosen.label, chosen.confidence, crop))
        inside = cam[
            int(letterboxed_box[1]) : int(letterboxed_box[3]) + 1, int(letterboxed_box[0]) : int(letterboxed_box[2]) + 1
        ]
        records.append({
            "path": detection.path, "box": list(chosen.box), "label": chosen.label, "confidence": chosen.confidence,
            "rank": box_rank, "file": name,
            "attribution_inside_box": round(float(inside.sum() / max(cam.sum(), 1e-12)), 4),
        })  # fmt: skip
    document = {"method": "gradcam", "explanations": records}
    write_json(out_dir / "explanations.json", document)
    return document, problems
