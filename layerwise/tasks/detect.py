"""Detection: boxes with labels and confidences for the objects in raw images.

Targets are boxes read from COCO JSON or YOLO text files; the network is FCOS on a registered backbone
(models/detector.py); the loss is focal + GIoU + centre-ness; the monitor is mAP@0.5 (COCO's, computed
by torchmetrics); the decoder is score threshold + NMS; the honest baseline is HOG + linear SVM over
sliding windows. Boxes are always reported in the original image's pixels.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layerwise.data.boxes import SCALE_JITTER, BoxBatches, choose_side, decode_annotated, letterbox, normalise
from layerwise.data.shards import ShardBatches, is_shard_folder, load_shard, load_split, read_pack
from layerwise.data.sources import Problem, discover_files
from layerwise.errors import DecodeError, InputError
from layerwise.models.registry import model_entry
from layerwise.runtime import model_device
from layerwise.tasks.base import FitOptions, PackOptions, Prepared, RunMismatch, fingerprint, result_rows

DEFAULT_MODEL = "fcos_resnet_s"
# Batch 8 at peak learning rate 2e-3 learned most in 5 CPU minutes on the composed scenes: test mAP@0.5 0.885 and
# 0.888 against 0.876-0.885 at batch 16 (three runs) and 0.858 at 4, though 8 train a fifth fewer images a second
# than 16. Earlier, after 150 s: validation mAP@0.5 0.60 (16, 2e-3), 0.61 (8, 1e-3), 0.56 (16, 1e-3), 0.08 (32,
# 3e-3: unstable).
# On a GPU the batch search starts from DEFAULT_BATCH and takes the largest that fits (learning rate scaled).
DEFAULT_BATCH = 8  # --batch-size sets any other, as given
# One convolution per FCOS head branch (FCOS has four), a fifth less compute per image than two: on the composed
# scenes with a 5-minute CPU budget four measured no better than two, and one as good as two (test mAP@0.5 0.853
# against 0.838 on scenes of up to 4 objects, 0.868 against 0.870 up to 6).
HEAD_CONVS = 1
DEFAULT_LR = 2e-3
EVAL_BATCH = 32
DEFAULT_THRESHOLD = 0.3  # detections below this confidence are not reported by `detect` / `predict`
# Test-time views must beat one pass on validation mAP@0.5 by this much to be kept: they cost two to four passes,
# and 600 validation scenes measure mAP@0.5 to about +-0.005. On the demo's 5-minute detectors, both sides plus
# their mirror images gained 0.014-0.017 test mAP@0.5 over one pass at 160 px (0.910-0.914) and both sides alone
# 0.008-0.012; mirror images alone 0.005-0.007, which is why they are not a candidate on their own.
MIN_VIEWS_GAIN = 0.005
REPORT_IMAGES = 12
STATS_SAMPLE = 500  # images the per-channel mean/std are measured on
MAX_BASELINE_IMAGES = 600  # training images the HOG + SVM baseline is fitted on
SHARD_BYTES = 256 << 20  # a packed shard's letterboxed images: 341 at side 512, 5,461 at side 128


@dataclass(frozen=True)
class DetectPreprocessing:
    side: int  # letterbox side: the longer image side is scaled to it
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def to_json(self) -> dict:
        return {"modality": "image", "letterbox": True, **asdict(self)}


@dataclass(frozen=True)
class BoxPrediction:
    label: str
    confidence: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the original image's pixels


@dataclass(frozen=True)
class Detection:
    path: str
    width: int
    height: int
    boxes: list[BoxPrediction]

    def to_json(self) -> dict:
        return {
            "path": self.path, "width": self.width, "height": self.height,
            "boxes": [
                {"label": b.label, "confidence": round(b.confidence, 6), "box": [round(v, 2) for v in b.box]}
                for b in self.boxes
            ],
        }  # fmt: skip

    def to_line(self) -> str:
        found = "; ".join(f"{b.label} {b.confidence:.2f} [{', '.join(f'{v:.0f}' for v in b.box)}]" for b in self.boxes)
        return f"{self.path}\t{len(self.boxes)} object(s)\t{found}"


class DetectTask:
    """A fitted detection task: the letterbox preprocessing and the class labels."""

    name = "detect"
    modality = "image"
    init_from = ("classify",)  # `--init` also takes an image classifier: its backbone stages become ours
    monitor = "map_50"
    higher_is_better = True
    commands = frozenset({"detect", "predict", "evaluate", "explain"})

    def __init__(self, prep: DetectPreprocessing, class_names: list[str]) -> None:
        self.prep = prep
        self.class_names = class_names

    @classmethod
    def claims(cls, data: Path) -> bool:
        from layerwise.data.detection import looks_like_detection

        return looks_like_detection(Path(data))

    def to_json(self) -> dict:
        return {"modality": "image", "preprocessing": self.prep.to_json(), "class_labels": self.class_names}

    @classmethod
    def from_config(cls, config: dict) -> DetectTask:
        prep = config["preprocessing"]
        return cls(
            DetectPreprocessing(prep["side"], tuple(prep["mean"]), tuple(prep["std"])), list(config["class_labels"])
        )

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        losses = model(images, targets)  # {"classification", "bbox_regression", "bbox_ctrness"}
        return sum(losses.values()), {name: float(value.detach()) for name, value in losses.items()}

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Validation loss and COCO mAP (torchmetrics) of the letterboxed validation images."""
        metric = new_metric()
        losses = []
        was_training = model.training
        for images, targets in batches.epoch(0):
            loss, detections = validate_batch(model, images, targets)
            losses.append(loss)
            metric.update(detections, targets)
        model.train(was_training)
        return {"loss": float(np.mean(losses)), **summarise_map(metric.compute(), self.class_names)}

    @classmethod
    def prepare(cls, data: Path, options: FitOptions, saved: dict | None = None, donor=None, log=print) -> Prepared:
        from layerwise.data.detection import read_detection

        if is_shard_folder(data):
            return cls.prepare_packed(data, options, saved, donor, log)
        source = read_detection(Path(data))
        log(
            f"{source.root}: {len(source.images)} images ({source.format}), {len(source.class_names)} classes, "
            f"{source.counts.get('objects', 0)} objects"
        )
        if saved is not None and list(saved["class_labels"]) != source.class_names:
            raise RunMismatch(
                f"--resume: {source.root} has classes {', '.join(source.class_names)}; the run was trained on "
                f"{', '.join(saved['class_labels'])}"
            )
        train_images, val_images = split_images(source.images, options.val_fraction, options.seed)
        if not val_images or not train_images:
            raise InputError(f"{source.root}: too few usable images to hold some out for validation")
        if saved is not None:
            p = saved["preprocessing"]
            prep = DetectPreprocessing(p["side"], tuple(p["mean"]), tuple(p["std"]))
        else:
            prep = DetectPreprocessing(choose_side([(im.width, im.height) for im in source.images]))
        started = time.perf_counter()
        train_pixels, train_targets, train_kept, train_problems = decode_annotated(train_images, prep.side)
        val_pixels, val_targets, val_kept, val_problems = decode_annotated(val_images, prep.side)
        decode_seconds = time.perf_counter() - started
        problems = source.problems + train_problems + val_problems
        if not train_kept or not val_kept:
            raise InputError(f"{source.root}: nothing usable is left to train on ({len(problems)} problems)")
        if saved is None:
            prep = fit_statistics(prep, train_pixels)
        root = source.root
        data_summary = {
            "source": str(root), "format": source.format, "n_train": len(train_kept), "n_val": len(val_kept),
            "n_skipped": len(problems), "val_fraction": options.val_fraction, "counts": source.counts,
            "fingerprint": fingerprint(
                [f"train {os.path.relpath(train_images[i].path, root)}" for i in train_kept]
                + [f"val {os.path.relpath(val_images[i].path, root)}" for i in val_kept]
            ),
        }  # fmt: skip
        if saved is not None and saved["data"].get("fingerprint") not in (None, data_summary["fingerprint"]):
            raise RunMismatch(f"--resume: the images under {root} differ from the ones the run started on")

        def train_batches(size: int) -> BoxBatches:
            return BoxBatches(
                train_pixels, train_targets, size, prep.mean, prep.std, augment=True, shuffle=True, seed=options.seed
            )

        split = f"validation: {options.val_fraction:.0%} of the images, seed {options.seed}"
        return cls.assemble(
            prep, source.class_names, options, train_batches, data_summary, problems,
            train_sample=(train_pixels, train_targets), val=(val_pixels, val_targets),
            val_images=[val_images[i] for i in val_kept], decode_seconds=decode_seconds, split=split,
            head=head_config(saved, donor, [boxes for boxes, _ in train_targets]),
        )  # fmt: skip

    @classmethod
    def assemble(
        cls, prep: DetectPreprocessing, class_names: list[str], options: FitOptions, train_batches: Callable,
        data_summary: dict, problems: list[Problem], *, train_sample: tuple, val: tuple, val_images: list,
        decode_seconds: float, split: str, head: dict[str, int],
    ) -> Prepared:  # fmt: skip
        """The Prepared of a detection run, from the files or from a pack: `train_batches(size)` makes its training
        batches; `train_sample` (pixels, targets) is what the classical baseline fits on, `val` the validation
        images held in memory."""
        batch = options.batch_size or DEFAULT_BATCH
        val_pixels, val_targets = val
        return Prepared(
            task=cls(prep, class_names),
            train_batches=train_batches(batch),
            batches_of=train_batches,
            val_batches=BoxBatches(val_pixels, val_targets, EVAL_BATCH, prep.mean, prep.std),
            model_name=detector_name(options),
            model_config={"num_classes": len(class_names), "side": prep.side, **head},
            data_summary=data_summary,
            problems=problems,
            batch_size=batch,
            lr=DEFAULT_LR,
            extras={
                "train_pixels": train_sample[0],
                "train_targets": train_sample[1],
                "val_pixels": val_pixels,
                "val_targets": val_targets,
                "val_images": val_images,
                "decode_seconds": decode_seconds,
                "split": f"{split} (also used for early stopping)",
            },  # fmt: skip
        )

    @classmethod
    def pack_into(cls, data: Path, staging: Path, options: PackOptions, log=print) -> dict:
        """`layerwise pack` for detection: the split by image and the letterbox side decided as `train` decides
        them, the letterboxed images in shards of `shard_size`, each split's boxes in one targets file."""
        from layerwise.data.boxes import write_box_shards
        from layerwise.data.detection import read_detection

        if options.modality not in (None, "image"):
            raise InputError(f"--modality {options.modality}: detection learns from images")
        source = read_detection(Path(data))
        train_images, val_images = split_images(source.images, options.val_fraction, options.seed)
        if not val_images or not train_images:
            raise InputError(f"{source.root}: too few usable images to hold some out for validation")
        prep = DetectPreprocessing(choose_side([(im.width, im.height) for im in source.images]))
        shard_size = options.shard_size or max(1, SHARD_BYTES // (3 * prep.side**2))
        shards, kept, problems = [], {}, list(source.problems)
        for split, images in (("train", train_images), ("val", val_images)):
            split_shards, kept_index, split_problems = write_box_shards(
                staging, split, images, prep.side, shard_size, options.seed, log
            )
            shards += split_shards
            kept[split] = [images[i] for i in kept_index]
            problems += split_problems
        if not kept["train"] or not kept["val"]:
            raise InputError(f"{source.root}: nothing usable is left to train on ({len(problems)} problems)")
        # Statistics from the first training shard: a random sample of the training images.
        first_train = next(shard for shard in shards if shard["split"] == "train")
        prep = fit_statistics(prep, load_shard(staging, first_train)[0])
        root = source.root
        return {
            "modality": "image", "source": str(root), "annotation_format": source.format, "units": "images",
            "preprocessing": asdict(prep), "class_labels": source.class_names, "counts": source.counts,
            "n_train": len(kept["train"]), "n_val": len(kept["val"]), "val_fraction": options.val_fraction,
            "seed": options.seed, "shard_size": shard_size, "shards": shards,
            "fingerprint": fingerprint(
                [f"{split} {os.path.relpath(image.path, root)}" for split, images in kept.items() for image in images]
            ),
            "val_images": [{"path": str(image.path), "width": image.width, "height": image.height}
                           for image in kept["val"]],
            "skipped": [p.to_json() for p in problems],
        }  # fmt: skip

    @classmethod
    def prepare_packed(cls, data: Path, options: FitOptions, saved: dict | None, donor, log=print) -> Prepared:
        """Training data `layerwise pack` wrote: the training images are streamed from their shards; the validation
        images and a sample of training images (for the classical baseline) are read into memory."""
        from layerwise.data.boxes import read_box_targets, shard_box_batches
        from layerwise.data.detection import AnnotatedImage

        index = read_pack(data, "detect", options.val_fraction, log)
        if options.modality not in (None, "image"):
            raise InputError(f"--modality {options.modality}: {data} holds packed images")
        class_names = list(index["class_labels"])
        if saved is not None and list(saved["class_labels"]) != class_names:
            raise RunMismatch(f"--resume: {data} has classes {', '.join(class_names)}; the run was trained on "
                              f"{', '.join(saved['class_labels'])}")  # fmt: skip
        if saved is not None and saved["data"].get("fingerprint") not in (None, index["fingerprint"]):
            raise RunMismatch(f"--resume: the images packed in {data} differ from the ones the run started on")
        p = saved["preprocessing"] if saved is not None else index["preprocessing"]
        prep = DetectPreprocessing(p["side"], tuple(p["mean"]), tuple(p["std"]))
        train_shards = [shard for shard in index["shards"] if shard["split"] == "train"]
        val_shards = [shard for shard in index["shards"] if shard["split"] == "val"]
        train_targets = read_box_targets(data, "train", index["n_train"])
        val_targets = read_box_targets(data, "val", index["n_val"])
        val_pixels, val_rows = load_split(data, val_shards)
        sample_pixels, sample_rows = load_split(data, train_shards, limit=MAX_BASELINE_IMAGES)
        no_boxes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)  # the report reads only path and size
        val_images = [AnnotatedImage(Path(im["path"]), im["width"], im["height"], *no_boxes)
                      for im in index["val_images"]]  # fmt: skip
        problems = [Problem(p["path"], p["reason"]) for p in index["skipped"]]
        log(f"{data}: {index['n_train']} + {index['n_val']} packed images in {len(index['shards'])} shards, "
            f"{len(class_names)} classes, side {prep.side}")  # fmt: skip
        data_summary = {
            "source": str(data), "packed_from": index["source"], "format": index["annotation_format"],
            "n_train": index["n_train"], "n_val": index["n_val"], "n_skipped": len(problems),
            "val_fraction": index["val_fraction"], "counts": index["counts"], "fingerprint": index["fingerprint"],
        }  # fmt: skip

        def train_batches(size: int) -> ShardBatches:
            return shard_box_batches(data, train_shards, size, train_targets, prep.mean, prep.std, augment=True,
                                     shuffle=True, seed=options.seed)  # fmt: skip

        split = f"validation: {index['val_fraction']:.0%} of the images, fixed when {data} was packed"
        return cls.assemble(
            prep, class_names, options, train_batches, data_summary, problems,
            train_sample=(sample_pixels, [train_targets[r] for r in sample_rows.tolist()]),
            val=(val_pixels, [val_targets[r] for r in val_rows.tolist()]), val_images=val_images,
            decode_seconds=0.0, split=split, head=head_config(saved, donor, [train_targets.boxes]),
        )  # fmt: skip

    # ------------------------------------------------------------------ after training

    def final_metrics(self, network: nn.Module, prepared: Prepared) -> dict:
        """COCO mAP of the best weights on the validation split, detecting as scores the highest mAP@0.5 there.

        First the inference side: the training side or 1.25 times it (`inference_sides`; a tie keeps the training
        side). Then test-time views (`test_time_views`): both sides, and both sides plus their mirror images,
        merged by one non-maximum suppression; kept only when they beat the one pass by MIN_VIEWS_GAIN, since
        they cost two to four passes. The network and the model config keep the choice, so every command that
        detects with the run uses it."""
        from layerwise.models.detector import inference_sides, test_time_views

        sides = inference_sides(self.prep.side)
        one_pass, with_views = {}, {}  # -> (COCO result, detections) on the validation split
        for side in sides:
            network.set_inference_side(side)
            one_pass[side] = validation_map(network, prepared.val_batches)
        for candidate in test_time_views(sides):
            network.set_inference_views(candidate)
            with_views[candidate] = validation_map(network, prepared.val_batches)
        by_side = {side: round(float(result["map_50"]), 6) for side, (result, _) in one_pass.items()}
        by_views = {views: round(float(result["map_50"]), 6) for views, (result, _) in with_views.items()}
        best, views = choose_inference(by_side, by_views)
        network.set_inference_side(best)
        network.set_inference_views(views)
        result, detections = with_views[views] if views else one_pass[best]
        prepared.model_config["inference_side"] = best
        prepared.model_config["inference_views"] = [list(view) for view in views] if views else None
        prepared.extras["map_result"], prepared.extras["val_detections"] = result, detections
        labelled = {view_label(((side, False),)): score for side, score in by_side.items()}
        labelled |= {view_label(candidate): score for candidate, score in by_views.items()}
        return summarise_map(result, self.class_names) | {
            "n_images": len(detections), "inference_side": best,
            "map_50_by_inference_side": {str(side): score for side, score in by_side.items()},
            "inference_views": [list(view) for view in network.inference_views], "map_50_by_inference_views": labelled,
        }  # fmt: skip

    def baseline(self, prepared: Prepared, seed: int) -> dict:
        from layerwise.tasks.hog_detector import HogSvmDetector

        started = time.perf_counter()
        extras = prepared.extras
        # HOG + SVM learns what it can from a few hundred images; more cost minutes and gigabytes for little gain.
        keep = sorted(
            random.Random(seed).sample(
                range(len(extras["train_pixels"])), min(MAX_BASELINE_IMAGES, len(extras["train_pixels"]))
            )
        )
        to_hwc = [extras["train_pixels"][i].permute(1, 2, 0).numpy() for i in keep]
        targets = [extras["train_targets"][i] for i in keep]
        detector = HogSvmDetector(len(self.class_names), seed=seed).fit(
            to_hwc, [b.numpy() for b, _ in targets], [lab.numpy() for _, lab in targets]
        )
        predictions = detector.predict([im.permute(1, 2, 0).numpy() for im in extras["val_pixels"]])
        metric = new_metric()
        metric.update(
            [{k: torch.as_tensor(v) for k, v in p.items()} for p in predictions],
            [{"boxes": b, "labels": lab} for b, lab in extras["val_targets"]],
        )
        scores = summarise_map(metric.compute(), self.class_names)
        return {
            "model": "HOG + linear SVM, sliding windows + NMS",
            **scores,
            "seconds": round(time.perf_counter() - started, 1),
        }

    def verdict(self, metrics: dict, baseline: dict, approach: str = "from scratch") -> str:
        from layerwise.baseline import verdict

        return verdict(
            metrics["map_50"], baseline.get("map_50"), metric="mAP@0.5 ", show=lambda v: f"{v:.3f}", approach=approach
        )

    def summary_rows(self, summary: dict) -> list[tuple[str, str]]:
        return result_rows(summary, "map_50", lambda v: f"mAP@0.5 {v:.3f}")

    def write_report(self, run_dir: Path, bundle, summary: dict, result, prepared: Prepared, log=print) -> None:
        from layerwise.report.detect_sections import detection_sections
        from layerwise.tasks.classify import write_task_report

        extras = prepared.extras
        sections = detection_sections(
            self.class_names, extras["map_result"], extras["val_pixels"], extras["val_targets"],
            extras["val_detections"], [im.origin for im in extras["val_images"]],
        )  # fmt: skip
        baseline = {k: v for k, v in summary["baseline"].items() if not isinstance(v, dict)}
        write_task_report(run_dir, bundle, summary, result, prepared, self, baseline, sections)

    def explain(self, bundle, inputs: list, out_dir: Path, methods: tuple[str, ...], target: str | None,
                texts: list[str] | None, box: int = 1) -> tuple[dict, list[Problem], list[str]]:  # fmt: skip
        """`layerwise explain`: Grad-CAM of each image's `box`-th most confident box."""
        from layerwise.explain.boxes import explain_boxes

        if texts:
            raise InputError("--text: this run detects objects in images, not text")
        document, problems = explain_boxes(bundle, inputs, out_dir, box)
        lines = [
            f"{r['path']}\t{r['label']}\t{r['confidence']:.3f}\t{out_dir / r['file']}" for r in document["explanations"]
        ]
        return document, problems, lines

    # ------------------------------------------------------------------ inference

    def find_images(self, inputs: list[str | Path]) -> tuple[list, list[Problem]]:
        paths = [Path(item) for item in inputs]
        found = discover_files(paths, "image")
        return found.examples, found.problems

    def detect(
        self, network: nn.Module, inputs: list[str | Path], threshold: float = DEFAULT_THRESHOLD
    ) -> tuple[list[Detection], list[Problem]]:
        """Boxes for every image file (folders searched recursively), in the original images' pixels."""
        examples, problems = self.find_images(inputs)
        detections = []
        for start in range(0, len(examples), EVAL_BATCH):
            part = examples[start : start + EVAL_BATCH]
            pixels, scales, sizes, kept = [], [], [], []
            for example in part:
                try:
                    image, scale, size = letterbox(example.path, self.prep.side)
                except DecodeError as err:
                    problems.append(Problem(example.origin, str(err)))
                    continue
                pixels.append(torch.from_numpy(image))
                scales.append(scale)
                sizes.append(size)
                kept.append(example)
            if not kept:
                continue
            images = normalise(torch.stack(pixels), self.prep.mean, self.prep.std).to(model_device(network))
            for example, found, scale, (width, height) in zip(
                kept, detect_batch(network, images), scales, sizes, strict=True
            ):
                detections.append(self.to_detection(example.origin, _cpu(found), scale, width, height, threshold))
        return detections, problems

    def to_detection(self, origin: str, found: dict, scale: float, width: int, height: int, threshold: float):
        boxes = (found["boxes"] / scale).clamp(min=0)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=height)
        keep = found["scores"] >= threshold
        return Detection(
            origin, width, height,
            [
                BoxPrediction(self.class_names[int(label)], float(score), tuple(float(v) for v in box))
                for box, score, label in zip(boxes[keep], found["scores"][keep], found["labels"][keep], strict=True)
            ],
        )  # fmt: skip

    def predict(self, network: nn.Module, inputs: list[str | Path], texts=None, k: int = 3, **options):
        if texts:
            raise InputError("--text: this run detects objects in images, not text")
        return self.detect(network, inputs, options.get("threshold", DEFAULT_THRESHOLD))

    # ------------------------------------------------------------------ export

    def export_graphs(self, network: nn.Module, data: Path, n: int) -> list:
        """`layerwise export`: the detector's dense outputs (every location's box and class scores) for real
        letterboxed images of `data`, with a dynamic batch; thresholding and NMS stay outside (see
        `export_decoding`)."""
        from layerwise.data.detection import read_detection
        from layerwise.models.detector import DenseDetections
        from layerwise.serve.export import MAX_BATCH, Graph

        images = read_detection(Path(data)).images
        chosen = images[:: max(1, len(images) // n)][:n]
        pixels = torch.stack([torch.from_numpy(letterbox(image.path, self.prep.side)[0]) for image in chosen])
        inputs = normalise(pixels, self.prep.mean, self.prep.std)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dense = DenseDetections(network).eval()
        meaning = (
            "boxes (batch, N, 4): x0, y0, x1, y1 in the letterboxed image's pixels for each of the N locations "
            f"(pyramid levels of {', '.join(map(str, dense.level_sizes))} locations, finest first, the levels of "
            f"each inference view in turn: {view_label(dense.views)} px, 'mirrored' meaning the image flipped left "
            "to right, whose boxes are already flipped back); scores (batch, N, classes): each location's "
            "confidence per class in the order of class_labels"
        )
        return [Graph(dense, (inputs,), ("images",), ("boxes", "scores"), ({0: batch},), meaning)]

    def export_decoding(self) -> str:
        fcos = "score > 0.05, at most 1,000 (location, class) pairs per pyramid level (of every view), the best first"
        return (
            "Input: letterbox each image: scale = side / max(width, height); resize it (bilinear) to "
            "round(width * scale) x round(height * scale); paste it at the top-left of a black side x side RGB "
            "canvas; pixels / 255, minus preprocessing.mean, divided by preprocessing.std per channel; layout "
            f"(3, side, side). Output, per image, as layerwise does: keep the pairs with {fcos}; non-maximum "
            "suppression per class at IoU 0.5 over all levels; the 100 best; divide the boxes by scale and clip "
            f"them to the original width and height; report those with score >= your threshold "
            f"(`layerwise detect` uses {DEFAULT_THRESHOLD})."
        )

    def predict_stream(self, network: nn.Module, examples: list, k: int = 3):
        detections, problems = self.detect(network, [e.path for e in examples])
        yield from problems
        yield from detections

    def find_inputs(self, inputs: list[str | Path], texts: list[str] | None = None):
        if texts:
            raise InputError("--text: this run detects objects in images, not text")
        return self.find_images(inputs)

    def evaluate_data(self, network: nn.Module, data: str | Path) -> tuple[dict, list[Problem]]:
        """COCO mAP on annotated images (COCO or YOLO), in the original images' pixels."""
        from layerwise.data.detection import read_detection

        source = read_detection(Path(data))
        unknown = sorted(set(source.class_names) - set(self.class_names))
        if unknown:
            raise InputError(f"{data}: classes {', '.join(unknown)} are not the run's ({', '.join(self.class_names)})")
        index = [self.class_names.index(name) for name in source.class_names]
        metric = new_metric()
        detections, problems = self.detect(network, [im.path for im in source.images], threshold=0.0)
        by_path = {d.path: d for d in detections}
        for image in source.images:
            found = by_path.get(image.origin)
            if found is None:
                continue
            metric.update(
                [{
                    "boxes": torch.tensor([b.box for b in found.boxes], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor([b.confidence for b in found.boxes], dtype=torch.float32),
                    "labels": torch.tensor([self.class_names.index(b.label) for b in found.boxes], dtype=torch.int64),
                }],
                [{"boxes": torch.from_numpy(image.boxes).float().reshape(-1, 4),
                  "labels": torch.tensor([index[i] for i in image.labels], dtype=torch.int64)}],
            )  # fmt: skip
        if not by_path:
            raise InputError(f"{data}: no decodable annotated image to evaluate")
        return summarise_map(metric.compute(), self.class_names) | {
            "n_images": len(by_path)
        }, source.problems + problems


# ---------------------------------------------------------------------- helpers


def detector_name(options: FitOptions) -> str:
    """--model, or the default detector; an error for a model without a detection head."""
    model_name = options.model or DEFAULT_MODEL
    if "detect" not in model_entry(model_name).tasks:
        raise InputError(f"--model {model_name} is not a detector (detectors: fcos_resnet_s, fcos_resnet_m)")
    return model_name


def split_images(images: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split by image (objects of one image never straddle the split)."""
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(images))) if len(images) >= 2 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [images[i] for i in train], [images[i] for i in val]


def fit_statistics(prep: DetectPreprocessing, pixels: torch.Tensor) -> DetectPreprocessing:
    sample = pixels[:: max(1, len(pixels) // STATS_SAMPLE)].float() / 255
    mean = tuple(sample.mean(dim=(0, 2, 3)).tolist())
    std = tuple(sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DetectPreprocessing(prep.side, mean, std)


def head_config(saved: dict | None, donor, train_boxes: list[torch.Tensor]) -> dict[str, int]:
    """The FCOS head's shape in the model config. A resumed run keeps its own. A detector started from another
    detect run takes that run's convolutions per branch (its output layers learned on that many), a new one
    HEAD_CONVS; both get the pyramid levels their training objects reach at the largest scale the augmentation
    gives them (the head's weights are the same on every level)."""
    from layerwise.models.detector import SAVED_HEAD_CONVS, SAVED_HEAD_LEVELS, head_levels_for

    if saved is not None and saved.get("task") == "detect":
        config = saved["model"]["config"]
        return {
            "head_convs": int(config.get("head_convs", SAVED_HEAD_CONVS)),
            "head_levels": int(config.get("head_levels", SAVED_HEAD_LEVELS)),
        }
    head_convs = HEAD_CONVS
    if donor is not None and donor.config.get("task") == "detect":
        head_convs = int(donor.config["model"]["config"].get("head_convs", SAVED_HEAD_CONVS))
    boxes = torch.cat([b.reshape(-1, 4).float() for b in train_boxes])
    longest = float((boxes[:, 2:] - boxes[:, :2]).max()) if len(boxes) else 0.0
    return {"head_convs": head_convs, "head_levels": head_levels_for(longest * SCALE_JITTER[1])}


def choose_inference(one_pass: dict[int, float], with_views: dict[tuple, float]) -> tuple[int, tuple | None]:
    """From validation mAP@0.5 by inference side (one pass) and by set of test-time views: the side (the best; the
    first of a tie) and the views (the best, the first of a tie: the fewer views), or None when they do not beat
    one pass at that side by MIN_VIEWS_GAIN."""
    side = max(one_pass, key=lambda s: one_pass[s])
    views = max(with_views, key=lambda v: with_views[v], default=None)
    if views is None or with_views[views] < one_pass[side] + MIN_VIEWS_GAIN:
        return side, None
    return side, views


def view_label(views) -> str:
    """How metrics.json names a set of inference views: "128", "128+160", "128+160+128 mirrored+160 mirrored"."""
    return "+".join(f"{side} mirrored" if mirrored else str(side) for side, mirrored in views)


def validation_map(network: nn.Module, batches) -> tuple[dict, list[dict]]:
    """torchmetrics' COCO result (with precision/recall) for the detections of `batches`, and the detections."""
    metric = new_metric(extended=True)
    detections = []
    for images, targets in batches.epoch(0):
        found = [_cpu(d) for d in detect_batch(network, images.to(model_device(network)))]
        detections += found
        metric.update(found, targets)
    return metric.compute(), detections


@torch.no_grad()
def detect_batch(model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    model.eval()
    return model(images)


@torch.no_grad()
def validate_batch(model: nn.Module, images: torch.Tensor, targets: list[dict]) -> tuple[float, list[dict]]:
    """The training loss on validation images and the detections (on the CPU), from one pass in eval mode:
    BatchNorm's running statistics must not learn from validation data."""
    model.eval()
    device = model_device(model)
    losses, detections = model.loss_and_detections(
        images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]
    )
    return float(sum(losses.values())), [_cpu(d) for d in detections]


def new_metric(extended: bool = False):
    from torchmetrics.detection import MeanAveragePrecision

    # No gathering across processes: in a multi-process run rank 0 alone validates, on the whole split, and
    # a metric waiting for the other ranks would wait forever. faster_coco_eval computes pycocotools' numbers
    # (tested) in a third of the time, which every epoch's validation pays.
    return MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=extended, sync_on_compute=False,
        backend="faster_coco_eval",
    )  # fmt: skip


def summarise_map(result: dict, class_names: list[str]) -> dict:
    """map, map_50, map_75, mar_100 and per-class AP (mAP@[.5:.95]) as plain floats."""
    metrics = {key: float(result[key]) for key in ("map", "map_50", "map_75", "mar_100")}
    per_class = result["map_per_class"].flatten().tolist()
    classes = result["classes"].flatten().tolist()
    metrics["per_class_ap"] = {
        class_names[int(c)]: (None if ap < 0 else round(float(ap), 6)) for c, ap in zip(classes, per_class, strict=True)
    }
    return metrics


def _cpu(detection: dict) -> dict:
    return {k: v.detach().cpu() for k, v in detection.items()}
