"""Report sections of the detection task: AP per class, precision-recall curves, validation images with
their predicted and true boxes, and the most-missed and most-hallucinated objects."""

from __future__ import annotations

import html
import io
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from layerwise.report.html import figure_png, png_data_uri

MATCH_IOU = 0.5
SHOWN_SCORE = 0.3  # predicted boxes drawn in the report: those a user of `detect` would see
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))  # fmt: skip


def draw_boxes(image: Image.Image, boxes, labels: list[str], scores=None, width: int = 2) -> Image.Image:
    """A copy of `image` with each box outlined and labelled (with its confidence when given)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        colour = PALETTE[zlib.crc32(label.removeprefix("true ").encode()) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = label if scores is None else f"{label} {float(scores[i]):.2f}"
        draw.text((x0 + 2, max(0, y0 - 11)), text, fill=colour)
    return out


def _png(image: Image.Image, scale: int = 2) -> bytes:
    buffer = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def match(found: dict, truth: dict) -> tuple[np.ndarray, np.ndarray]:
    """Greedy same-class matching at IoU 0.5 among shown predictions: (truth matched (K,), prediction matched (M,))."""
    keep = found["scores"] >= SHOWN_SCORE
    boxes, labels = found["boxes"][keep], found["labels"][keep]
    truth_hit = np.zeros(len(truth["boxes"]), bool)
    found_hit = np.zeros(len(boxes), bool)
    if len(boxes) and len(truth["boxes"]):
        iou = box_iou(boxes, truth["boxes"]).numpy()
        same = labels[:, None].numpy() == truth["labels"][None, :].numpy()
        iou = np.where(same, iou, 0)
        for p in np.argsort(-found["scores"][keep].numpy()):
            t = int(np.argmax(np.where(truth_hit, 0, iou[p])))
            if iou[p, t] >= MATCH_IOU and not truth_hit[t]:
                truth_hit[t], found_hit[p] = True, True
    return truth_hit, found_hit


def pr_curves_png(result: dict, class_names: list[str]) -> bytes | None:
    """Precision against recall at IoU 0.5, all areas, 100 detections, per class (COCO's interpolated curve)."""
    from matplotlib.figure import Figure

    precision = result.get("precision")
    if precision is None or precision.numel() == 0:
        return None
    curves = precision[0, :, :, 0, -1]  # (recall points, classes)
    recall = np.linspace(0, 1, curves.shape[0])
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    classes = result["classes"].flatten().tolist()
    for k, c in enumerate(classes):
        values = curves[:, k].numpy()
        if (values >= 0).any():
            ax.plot(recall, np.where(values < 0, np.nan, values), label=class_names[int(c)])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def detection_sections(
    class_names: list[str],
    result: dict,
    pixels: torch.Tensor,
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    detections: list[dict],
    origins: list[str],
) -> list[tuple[str, str]]:
    """(heading, trusted HTML) pairs for report.html."""
    per_class = result["map_per_class"].flatten().tolist()
    classes = result["classes"].flatten().tolist()
    truth = [{"boxes": b, "labels": lab} for b, lab in targets]
    missed = np.zeros(len(class_names), int)
    hallucinated = np.zeros(len(class_names), int)
    total = np.zeros(len(class_names), int)
    misses_per_image = []
    for found, t in zip(detections, truth, strict=True):
        truth_hit, found_hit = match(found, t)
        for label, hit in zip(t["labels"].tolist(), truth_hit, strict=True):
            total[label] += 1
            missed[label] += not hit
        shown = found["labels"][found["scores"] >= SHOWN_SCORE].tolist()
        for label, hit in zip(shown, found_hit, strict=True):
            hallucinated[label] += not hit
        misses_per_image.append(int((~truth_hit).sum()) + int((~found_hit).sum()))

    rows = "".join(
        f"<tr><th>{html.escape(class_names[int(c)])}</th><td>{'&mdash;' if ap < 0 else f'{ap:.3f}'}</td>"
        f"<td>{total[int(c)]}</td><td>{missed[int(c)]}</td><td>{hallucinated[int(c)]}</td></tr>"
        for c, ap in zip(classes, per_class, strict=True)
    )
    table = (
        '<table class="summary"><tr><th>class</th><th>AP@[.5:.95]</th><th>objects</th>'
        f"<th>missed at IoU 0.5</th><th>hallucinated (score &ge; {SHOWN_SCORE})</th></tr>{rows}</table>"
    )
    sections = [("Average precision per class", table)]
    curves = pr_curves_png(result, class_names)
    if curves is not None:
        sections.append(("Precision–recall at IoU 0.5", f'<img src="{png_data_uri(curves)}" alt="precision-recall">'))

    def card(i: int) -> str:
        image = Image.fromarray(pixels[i].permute(1, 2, 0).numpy())
        shown = detections[i]["scores"] >= SHOWN_SCORE
        drawn = draw_boxes(
            image, truth[i]["boxes"], [f"true {class_names[int(j)]}" for j in truth[i]["labels"]], width=1
        )
        drawn = draw_boxes(
            drawn, detections[i]["boxes"][shown], [class_names[int(j)] for j in detections[i]["labels"][shown]],
            detections[i]["scores"][shown],
        )  # fmt: skip
        return (
            f'<div class="card"><img src="{png_data_uri(_png(drawn))}" alt="validation image">'
            f"<div>{html.escape(origins[i])}</div></div>"
        )

    note = (
        '<p class="note">Thin boxes: the annotation ("true ..."); thick boxes: the network\'s detections with '
        f"confidence &ge; {SHOWN_SCORE}.</p>"
    )
    first = list(range(min(len(detections), 12)))
    worst = [i for i in np.argsort(misses_per_image)[::-1][:6].tolist() if misses_per_image[i] > 0]
    sections.append(("Validation images", note + '<div class="cards">' + "".join(card(i) for i in first) + "</div>"))
    if worst:
        body = "<p>The validation images with the most missed and hallucinated objects.</p>"
        sections.append(
            ("Most missed and hallucinated", body + '<div class="cards">' + "".join(card(i) for i in worst) + "</div>")
        )
    return sections
