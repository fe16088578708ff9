"""Pictures of detections: each input image with its boxes, labels and confidences drawn."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from layerwise.files import write_atomic


def write_detection_pictures(detections: list, out_dir: Path) -> list[Path]:
    """One PNG per detection in `out_dir`, named after the input (numbered when two inputs share a name)."""
    import io

    from layerwise.report.detect_sections import draw_boxes

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for detection in detections:
        stem = Path(detection.path).stem
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        with Image.open(detection.path) as image:
            drawn = draw_boxes(
                image, [b.box for b in detection.boxes], [b.label for b in detection.boxes],
                [b.confidence for b in detection.boxes], width=max(2, round(max(image.size) / 200)),
            )  # fmt: skip
        buffer = io.BytesIO()
        drawn.save(buffer, format="PNG")
        written.append(write_atomic(out_dir / name, buffer.getvalue()))
    return written
