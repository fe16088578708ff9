"""The detect task end to end on composed scenes: training, mAP, detect/evaluate commands, coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layerwise.data.boxes import BoxAugmentation, BoxBatches, jitter_colour, letterbox
from layerwise.data.scenes import compose_scenes
from layerwise.errors import InputError


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return compose_scenes(tmp_path_factory.mktemp("scenes") / "train", 120, seed=0, split="train")


@pytest.fixture(scope="module")
def test_scenes(tmp_path_factory) -> Path:
    return compose_scenes(tmp_path_factory.mktemp("scenes") / "test", 30, seed=1, split="test")


@pytest.fixture(scope="module")
def detect_run(scenes, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from layerwise.cli import app

    run = tmp_path_factory.mktemp("detect_runs") / "run"
    args = ["train", str(scenes), "--out", str(run), "--epochs", "3", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return run


def copy_choosing(run: Path, copy: Path, **model_config) -> Path:
    """A copy of `run` whose model config says `model_config`: as if its validation had chosen them."""
    import shutil

    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["config"] |= model_config
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def run_at_160(detect_run, tmp_path_factory) -> Path:
    """The detect run as if validation had chosen one pass at 160 px (the fixture's own choice varies)."""
    return copy_choosing(detect_run, tmp_path_factory.mktemp("detect_runs") / "at_160", inference_side=160,
                         inference_views=None)  # fmt: skip


@pytest.fixture(scope="module")
def run_with_views(detect_run, tmp_path_factory) -> Path:
    """The detect run as if validation had chosen its widest test-time views (the fixture's own choice varies)."""
    from layerwise.models.detector import inference_sides, test_time_views

    views = [list(view) for view in test_time_views(inference_sides(128))[-1]]
    return copy_choosing(detect_run, tmp_path_factory.mktemp("detect_runs") / "with_views", inference_views=views)


def test_the_task_is_detected_from_the_annotations_and_the_run_is_complete(detect_run: Path) -> None:
    config = json.loads((detect_run / "config.json").read_text())
    assert config["task"] == "detect" and config["model"]["name"] == "fcos_resnet_s"
    assert config["preprocessing"]["side"] == 128
    summary = json.loads((detect_run / "metrics.json").read_text())
    assert {"map", "map_50", "map_75", "mar_100", "per_class_ap"} <= summary["metrics"].keys()
    assert summary["baseline"]["model"].startswith("HOG") and "map_50" in summary["baseline"]
    assert "mAP@0.5" in summary["verdict"]
    report = (detect_run / "report.html").read_text()
    assert "Average precision per class" in report and "Validation images" in report
    history = [json.loads(line) for line in (detect_run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 and "val_map_50" in history[0]


def test_evaluate_prints_the_coco_metrics(cli, detect_run, test_scenes) -> None:
    code, out, err = cli("evaluate", detect_run, test_scenes, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert {"map", "map_50", "map_75", "mar_100", "per_class_ap", "n_images"} <= metrics.keys()
    assert metrics["n_images"] == 30 and 0 <= metrics["map"] <= metrics["map_50"] <= 1


def test_validation_takes_loss_and_boxes_from_one_pass_and_scores_them_as_pycocotools_does(
    detect_run, test_scenes
) -> None:
    """One eval-mode pass gives FCOS's training loss and its detections (torchvision's forward gives either), and
    faster_coco_eval, which validation uses for speed, gives pycocotools' COCO numbers."""
    from torchmetrics.detection import MeanAveragePrecision

    from layerwise.api import load
    from layerwise.data.detection import read_detection
    from layerwise.tasks.detect import decode_annotated, detect_batch, new_metric, validate_batch

    model = load(detect_run)
    network, prep = model.network, model.task.prep
    network.set_inference_side(prep.side)  # as during training, whichever side and views the run chose afterwards
    network.set_inference_views(None)
    pixels, targets, _, _ = decode_annotated(read_detection(test_scenes).images, prep.side)
    images, _ = BoxBatches(pixels, targets, 30, prep.mean, prep.std).batch_at(0, 0)
    boxes = [{"boxes": b, "labels": lab} for b, lab in targets]
    loss, found = validate_batch(network, images, boxes)
    network.train()
    for module in network.modules():  # the loss as train mode computes it, BatchNorm on its running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        assert loss == pytest.approx(float(sum(network(images, boxes).values())), rel=1e-5)
    separately = detect_batch(network, images)
    for one_pass, alone in zip(found, separately, strict=True):
        assert set(one_pass) == {"boxes", "scores", "labels"} and len(one_pass["boxes"]) > 0
        for key in one_pass:
            torch.testing.assert_close(one_pass[key], alone[key])
    fast, reference = new_metric(), MeanAveragePrecision(box_format="xyxy", class_metrics=True)
    fast.update(found, boxes)
    reference.update(found, boxes)
    fast, reference = fast.compute(), reference.compute()
    for key in ("map", "map_50", "map_75", "mar_100", "map_per_class"):
        torch.testing.assert_close(fast[key], reference[key], atol=1e-4, rtol=0)


def test_detect_draws_pictures_and_prints_boxes_in_original_pixels(cli, detect_run, test_scenes, tmp_path) -> None:
    # the same scene at three sizes: boxes must scale with the image
    source = next((test_scenes / "images").glob("*.png"))
    paths = []
    for size in ((128, 128), (256, 256), (300, 180)):
        path = tmp_path / f"scene_{size[0]}x{size[1]}.png"
        Image.open(source).resize(size, Image.Resampling.NEAREST).save(path)  # 2x: each pixel a 2x2 block
        paths.append(path)
    code, out, err = cli("detect", detect_run, *paths, "--out", tmp_path / "drawn", "--json", "--threshold", "0.0")
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [(r["width"], r["height"]) for r in results] == [(128, 128), (256, 256), (300, 180)]
    for r in results:
        assert r["boxes"] and all(0 <= b["box"][0] <= b["box"][2] <= r["width"] for b in r["boxes"])
        assert all(0 <= b["box"][1] <= b["box"][3] <= r["height"] for b in r["boxes"])
    # The 256 px copy letterboxes back to (almost exactly) the 128 px pixels: the same detections, doubled.
    # (Each of the first against all of the second: a briefly trained model has near-ties, whose order and whose
    # survivor of non-maximum suppression may swap.)
    small = 2 * np.array([b["box"] for b in results[0]["boxes"][:3]])
    large = np.array([b["box"] for b in results[1]["boxes"]])
    assert all(np.abs(large - box).max(axis=1).min() <= 2 for box in small)
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(p.stem + ".png" for p in paths)
    code, out, _ = cli("predict", detect_run, paths[0], "--json")
    assert code == 0 and {"path", "width", "height", "boxes"} <= json.loads(out.splitlines()[0]).keys()


def test_classification_commands_refuse_a_detect_run(cli, detect_run, test_scenes) -> None:
    code, _, err = cli("shift", detect_run, test_scenes)
    assert code == 2 and "does not apply to a detect run" in err


def test_boxes_follow_each_augmentation_exactly() -> None:
    """Each box after the flip and the scale jitter equals the box around the equally moved object (the jitter
    interpolates nearest, so the object's pixels are its mask), and a box pushed out of the frame goes with its
    label."""
    side, n = 128, 40
    images = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    images[:, :, 30:70, 40:90] = 200
    boxes = [torch.tensor([[40.0, 30.0, 90.0, 70.0]])] * n
    labels = [torch.tensor([1])] * n
    torch.manual_seed(0)
    moved, moved_boxes, moved_labels = BoxAugmentation().geometric(images, boxes, labels)
    assert moved.shape == images.shape and moved.dtype == torch.uint8
    flipped = rescaled = 0
    for image, box, label in zip(moved, moved_boxes, moved_labels, strict=True):
        mask = image[0] > 0
        assert len(box) == len(label)
        if not len(box):
            assert mask.sum() < 20  # the object left the frame, and its box was dropped with it
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert torch.allclose(box[0], from_mask, atol=1.5)
        rescaled += abs(float(from_mask[2] - from_mask[0]) - 50) > 1
        flipped += box[0].tolist() == [side - 90.0, 30.0, side - 40.0, 70.0]
    assert rescaled >= 3 and 5 <= flipped <= n - 5  # the jitter reaches a quarter of the images, the flip half


def test_colour_jitter_is_torchvisions_with_a_factor_per_image() -> None:
    from torchvision.transforms.v2 import functional as F

    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    brightness, contrast, saturation = torch.tensor([0.7, 1.0, 1.3]), torch.tensor([1.2, 0.8, 1.0]), torch.ones(3)
    saturation[0] = 0.75
    jittered = jitter_colour(images, brightness, contrast, saturation)
    for i, image in enumerate(images.float() / 255):
        expected = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(image, float(brightness[i])),
                                                         float(contrast[i])), float(saturation[i]))  # fmt: skip
        assert (jittered[i].float() - expected * 255).abs().max() <= 1.0


def test_runs_saved_before_the_head_size_was_stored_load_with_their_two_convolutions_on_three_levels() -> None:
    from layerwise.models import create_model

    def head_convs(network) -> int:
        return sum(isinstance(m, torch.nn.Conv2d) for m in network.fcos.head.classification_head.conv)

    def levels(network) -> int:
        return len(network.forward_features(torch.zeros(1, 3, 128, 128)))

    saved = create_model("fcos_resnet_s", num_classes=2, side=128)  # config.json without head_convs, head_levels
    assert head_convs(saved) == 2 and levels(saved) == 3
    new = create_model("fcos_resnet_s", num_classes=2, side=128, head_convs=1, head_levels=1)
    assert head_convs(new) == 1 and levels(new) == 1
    # the levels change no weights: a two-convolution head on one level loads the saved three-level weights
    create_model("fcos_resnet_s", num_classes=2, side=128, head_convs=2, head_levels=1).load_state_dict(
        saved.state_dict()
    )


def test_the_head_is_on_the_levels_torchvisions_fcos_assigns_the_training_objects_to() -> None:
    """Square objects of each size, centred at every quarter pixel across two coarse strides, through FCOS's own
    matching: the coarsest level any of them reaches is the last one `head_levels_for` keeps (objects up to 80
    px, such as the demo's 23-58 px with scale jitter, reach only the finest level)."""
    from torchvision.models.detection.image_list import ImageList

    from layerwise.models import create_model
    from layerwise.models.detector import head_levels_for
    from layerwise.tasks.detect import head_config

    side = 384
    fcos = create_model("fcos_resnet_s", num_classes=2, side=side, head_convs=1, head_levels=3).fcos
    images = torch.zeros(1, 3, side, side)
    features = list(fcos.backbone(images).values())
    anchors = fcos.anchor_generator(ImageList(images, [(side, side)]), features)[0]
    level = torch.cat([torch.full((f.shape[2] * f.shape[3],), i) for i, f in enumerate(features)])
    matched = []
    fcos.head.compute_loss = lambda targets, outputs, anchors, matched_idxs: matched.extend(matched_idxs) or {}
    for longest in (40, 72, 80, 81, 100, 160, 161, 200):
        centres = 160 + torch.arange(0, 64, 0.25)
        targets = [{"boxes": torch.tensor([[c - longest / 2, c - longest / 2, c + longest / 2, c + longest / 2]]),
                    "labels": torch.tensor([1])} for c in centres.tolist()]  # fmt: skip
        matched.clear()
        fcos.compute_loss(targets, {}, [anchors] * len(targets), [f.shape[2] * f.shape[3] for f in features])
        reached = max(int(level[m >= 0].max()) for m in matched)
        assert head_levels_for(longest) == reached + 1, longest
    assert head_levels_for(0) == 1
    small = [torch.tensor([[10.0, 10.0, 68.0, 40.0]]), torch.zeros(0, 4)]  # a 58-px object and a negative image
    assert head_config(None, None, small)["head_levels"] == 1
    assert head_config(None, None, small + [torch.tensor([[0.0, 0.0, 100.0, 20.0]])])["head_levels"] == 2
    saved = {"task": "detect", "model": {"config": {"num_classes": 2, "side": 128}}}  # a resumed run keeps its own
    assert head_config(saved, None, small)["head_levels"] == 3


def test_a_run_saved_with_a_two_convolution_head_resumes_and_starts_others_with_it(
    scenes, tmp_path, monkeypatch
) -> None:
    """Runs from before the head size was stored (no `head_convs` in config.json) have two convolutions: resuming
    one, or starting a detector from it with --init, keeps that head instead of failing on its weights."""
    import layerwise.tasks.detect as detect
    from layerwise.api import fit, load

    old = tmp_path / "old"
    with monkeypatch.context() as patch:
        patch.setattr(detect, "HEAD_CONVS", 2)
        fit(scenes, old, task="detect", epochs=1, show_progress=False)
    config = json.loads((old / "config.json").read_text())
    assert config["model"]["config"]["head_levels"] == 1  # the scenes' objects reach the finest level only
    del config["model"]["config"]["head_convs"], config["model"]["config"]["head_levels"]
    (old / "config.json").write_text(json.dumps(config))
    resumed = fit(scenes, old, epochs=2, resume=True, show_progress=False)
    started = fit(scenes, tmp_path / "started", task="detect", epochs=1, init=old, show_progress=False)
    for model in (resumed, started, load(old)):
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.network.fcos.head.classification_head.conv) == 2
    assert len(resumed.network.fcos.anchor_generator.sizes) == 3  # a run saved before head_levels: all three
    assert len(started.network.fcos.anchor_generator.sizes) == 1  # a new run: the levels its objects reach
    assert len((old / "history.jsonl").read_text().splitlines()) == 2


def test_letterbox_scales_and_pads(tmp_path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 150), (255, 0, 0)).save(path)
    pixels, scale, size = letterbox(path, 128)
    assert size == (300, 150) and scale == pytest.approx(128 / 300)
    assert pixels.shape == (3, 128, 128) and pixels[0, :60].min() == 255 and pixels[:, 70:].max() == 0


def test_the_batch_size_asked_for_is_the_one_used(scenes) -> None:
    from layerwise.tasks.base import FitOptions
    from layerwise.tasks.detect import DEFAULT_BATCH, DetectTask

    for asked, used in ((None, DEFAULT_BATCH), (4, 4), (32, 32)):  # 32: above the old silent cap of 16
        prepared = DetectTask.prepare(scenes, FitOptions(batch_size=asked), log=lambda *_: None)
        assert prepared.batch_size == used and len(next(iter(prepared.train_batches.epoch(0)))[0]) == used


def test_batches_are_seeded_and_keep_the_random_stream() -> None:
    images = torch.randint(0, 255, (6, 3, 64, 64), dtype=torch.uint8)
    targets = [(torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([0])) for _ in range(6)]
    batches = BoxBatches(images, targets, 4, (0.5,) * 3, (0.25,) * 3, augment=True, shuffle=True, seed=1)
    torch.manual_seed(0)
    first = [(x.clone(), [t["boxes"].clone() for t in y]) for x, y in batches.epoch(2)]
    after = torch.rand(1)
    torch.manual_seed(0)
    second = [(x.clone(), [t["boxes"].clone() for t in y]) for x, y in batches.epoch(2)]
    assert torch.rand(1) == after  # augmentation did not consume the global generator
    for (x1, b1), (x2, b2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and all(torch.equal(a, b) for a, b in zip(b1, b2, strict=True))


def test_batches_hold_copies_and_leave_the_data_as_it_was() -> None:
    images = torch.randint(0, 255, (8, 3, 64, 64), dtype=torch.uint8)
    targets = [(torch.tensor([[5.0, 5.0, 30.0, 30.0 + i]]), torch.tensor([i % 2])) for i in range(8)]
    kept_images, kept_targets = images.clone(), [(b.clone(), lab.clone()) for b, lab in targets]
    batches = BoxBatches(images, targets, 4, (0.5,) * 3, (0.25,) * 3, augment=True, shuffle=True, seed=0)
    stored = {t.data_ptr() for pair in targets for t in pair}
    for _, batch_targets in batches.epoch(0):
        assert not stored & {t.data_ptr() for target in batch_targets for t in target.values()}
    assert torch.equal(images, kept_images)
    for (b, lab), (kept_b, kept_lab) in zip(targets, kept_targets, strict=True):
        assert torch.equal(b, kept_b) and torch.equal(lab, kept_lab)


def test_worker_processes_make_the_same_augmented_batches_in_order() -> None:
    images = torch.randint(0, 255, (10, 3, 64, 64), dtype=torch.uint8)
    targets = [(torch.tensor([[5.0, 5.0, 30.0 + i, 30.0]]), torch.tensor([i % 3])) for i in range(10)]
    batches = BoxBatches(images, targets, 3, (0.5,) * 3, (0.25,) * 3, augment=True, shuffle=True, seed=1)
    assert batches.streamed_to(torch.device("cpu")).workers == 0  # on a CPU the training threads use the cores
    streamed = batches.streamed_to(torch.device("cpu"))
    streamed.workers = 2  # as on a GPU machine (without pinning: no GPU here)
    for start in (0, 2):
        alone, made = list(batches.epoch(1, start)), list(streamed.epoch(1, start))
        assert len(made) == len(alone) == len(batches) - start
        for (x1, y1), (x2, y2) in zip(alone, made, strict=True):
            assert torch.equal(x1, x2)
            assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
                       for a, b in zip(y1, y2, strict=True))  # fmt: skip


@pytest.fixture(scope="module")
def packed_scenes(scenes, tmp_path_factory) -> Path:
    from layerwise.pack import pack

    out = tmp_path_factory.mktemp("packed") / "scenes"
    pack(scenes, out, shard_size=32, log=lambda _: None)
    return out


def test_packed_scenes_hold_each_image_letterboxed_with_its_boxes(packed_scenes, scenes) -> None:
    from layerwise.data.boxes import decode_annotated, read_box_targets
    from layerwise.data.detection import read_detection
    from layerwise.data.shards import load_split, read_index

    index = read_index(packed_scenes)
    assert (index["task"], index["units"], index["n_train"], index["n_val"]) == ("detect", "images", 108, 12)
    assert max(shard["n"] for shard in index["shards"]) == 32 and index["preprocessing"]["side"] == 128
    # The validation images, in shard order, are the files' own letterboxed pixels and boxes.
    by_path = {str(image.path): image for image in read_detection(scenes).images}
    raw_pixels, raw_targets, _, _ = decode_annotated([by_path[im["path"]] for im in index["val_images"]], 128)
    pixels, rows = load_split(packed_scenes, [shard for shard in index["shards"] if shard["split"] == "val"])
    targets = [read_box_targets(packed_scenes, "val", 12)[row] for row in range(12)]
    assert torch.equal(pixels, raw_pixels) and rows.tolist() == list(range(12))
    for (boxes, labels), (raw_boxes, raw_labels) in zip(targets, raw_targets, strict=True):
        assert torch.equal(boxes, raw_boxes) and torch.equal(labels, raw_labels)


def test_packed_batches_bring_each_image_with_its_own_boxes_and_resume_mid_epoch_from_workers_too(packed_scenes):
    from layerwise.data.boxes import read_box_targets, shard_box_batches
    from layerwise.data.shards import load_split, read_index

    index = read_index(packed_scenes)
    train = [shard for shard in index["shards"] if shard["split"] == "train"]
    targets = read_box_targets(packed_scenes, "train", 108)
    with pytest.raises(InputError, match="train-targets.safetensors: has no row 108"):
        targets[108]  # a shard label past the table: a damaged pack, named
    pixels, rows = load_split(packed_scenes, train)
    row_of = {pixels[k].numpy().tobytes(): row for k, row in enumerate(rows.tolist())}
    batches = shard_box_batches(packed_scenes, train, 16, targets, (0.0,) * 3, (1 / 255,) * 3, shuffle=True, seed=3)
    seen = []
    for images, batch_targets in batches.epoch(2):
        for image, target in zip(images, batch_targets, strict=True):
            row = row_of[image.round().to(torch.uint8).numpy().tobytes()]  # mean 0, std 1/255: the pixels back
            assert torch.equal(target["boxes"], targets[row][0]) and torch.equal(target["labels"], targets[row][1])
            seen.append(row)
    assert len(seen) == len(set(seen)) == 16 * len(batches) and len(batches) == 108 // 16  # no ragged last batch
    assert seen[:16] != sorted(seen[:16])  # shuffled
    augmented = shard_box_batches(packed_scenes, train, 16, targets, (0.5,) * 3, (0.25,) * 3, augment=True,
                                  shuffle=True, seed=3)  # fmt: skip
    streamed = augmented.streamed_to(torch.device("cpu"))
    streamed.workers = 2  # as on a GPU machine (without pinning: no GPU here)
    whole, resumed = list(augmented.epoch(1)), list(augmented.epoch(1, start=4))
    assert len(resumed) == len(whole) - 4
    for (x1, y1), (x2, y2), (x3, y3) in zip(whole[4:], resumed, streamed.epoch(1, start=4), strict=True):
        assert torch.equal(x1, x2) and torch.equal(x1, x3)
        assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["boxes"], c["boxes"])
                   for a, b, c in zip(y1, y2, y3, strict=True))  # fmt: skip


@pytest.mark.slow
def test_a_detector_trains_from_packed_scenes(cli, packed_scenes, scenes, tmp_path) -> None:
    run = tmp_path / "run"
    code, _, err = cli("train", packed_scenes, "--out", run, "--epochs", "1", "--no-progress")
    assert code == 0, err
    config, metrics = (json.loads((run / name).read_text()) for name in ("config.json", "metrics.json"))
    assert config["task"] == "detect" and config["data"]["packed_from"] == str(scenes)
    assert config["data"]["n_train"] == 108 and "map_50" in metrics["metrics"] and "map_50" in metrics["baseline"]
    assert (run / "report.html").is_file()
    code, _, err = cli("evaluate", run, packed_scenes)  # raw files are needed: the pack names them
    assert code == 2 and f"give the data it was packed from ({scenes})" in err


@pytest.mark.slow
def test_a_detector_overfits_a_handful_of_scenes(tmp_path) -> None:
    """FCOS on the resnet_s backbone learns 8 scenes to mAP@0.5 >= 0.95 (no augmentation)."""
    from layerwise.data.detection import read_detection
    from layerwise.models import create_model
    from layerwise.tasks.detect import HEAD_CONVS, DetectPreprocessing, DetectTask, decode_annotated, head_config
    from layerwise.training.loop import TrainConfig, train

    data = compose_scenes(tmp_path / "few", 8, seed=3, split="train")
    source = read_detection(data)
    pixels, targets, kept, _ = decode_annotated(source.images, 128)
    assert len(kept) == 8
    task = DetectTask(DetectPreprocessing(128), source.class_names)
    batches = BoxBatches(pixels, targets, 8, task.prep.mean, task.prep.std)
    torch.manual_seed(0)
    levels = head_config(None, None, [boxes for boxes, _ in targets])["head_levels"]  # as a new run here gets
    network = create_model(
        "fcos_resnet_s", num_classes=len(source.class_names), side=128, head_convs=HEAD_CONVS, head_levels=levels
    )
    config = TrainConfig(epochs=40, batch_size=8, lr=2e-3, patience=10**6, seed=0)
    train(network, batches, batches, config, show_progress=False, objective=task, log=lambda _: None)
    assert task.evaluate(network, batches)["map_50"] >= 0.95


def test_explain_shows_which_pixels_drove_a_box(cli, detect_run, test_scenes, tmp_path) -> None:
    image = sorted((test_scenes / "images").glob("*.png"))[1]
    code, out, err = cli("explain", detect_run, image, "--out", tmp_path / "why", "--json", "--box", "1")
    assert code == 0, err
    record = json.loads(out)["explanations"][0]
    assert (
        record["path"] == str(image)
        and record["label"] in json.loads((detect_run / "config.json").read_text())["class_labels"]
    )
    assert (tmp_path / "why" / record["file"]).read_bytes()[:4] == b"\x89PNG"
    assert 0 <= record["attribution_inside_box"] <= 1


def test_bad_annotations_are_named_and_training_goes_on(cli, scenes, tmp_path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    document = json.loads((data / "annotations.json").read_text())
    document["annotations"][0]["category_id"] = 99  # unknown category
    document["annotations"][1]["bbox"] = [10, 10, 0, 5]  # zero area
    document["images"].append({"id": 10**6, "file_name": "images/missing.png", "width": 128, "height": 128})
    document["annotations"].append(
        {"id": 10**6, "image_id": 10**6, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
    )
    (data / "annotations.json").write_text(json.dumps(document))
    (data / "images" / document["images"][2]["file_name"].split("/")[-1]).write_bytes(b"not an image")
    run = tmp_path / "run"
    code, _, err = cli("train", data, "--out", run, "--epochs", "1", "--no-progress")
    assert code == 0, err
    skipped = json.loads((run / "problems.json").read_text())["skipped"]
    reasons = " | ".join(f"{p['path']}: {p['reason']}" for p in skipped)
    assert "99" in reasons and "missing.png" in reasons and document["images"][2]["file_name"].split("/")[-1] in reasons
    (data / "annotations.json").write_text('{"images": [1, 2,,]}')
    code, _, err = cli("train", data, "--out", tmp_path / "run2", "--epochs", "1", "--no-progress")
    assert code == 2 and "line 1" in err and "column" in err


def test_the_server_answers_with_boxes_for_a_detect_run(cli, detect_run, test_scenes) -> None:
    import httpx
    from test_serve import running_server, upload

    files = sorted((test_scenes / "images").glob("*.png"))[:2]
    code, out, _ = cli("detect", detect_run, *files, "--json")
    expected = [json.loads(line) for line in out.splitlines()]
    with running_server(detect_run, max_wait_ms=5) as url:
        got = httpx.post(f"{url}/predict", files=upload(*files)).json()["predictions"]
    assert [g["path"] for g in got] == [f.name for f in files]
    for g, e in zip(got, expected, strict=True):
        assert g["boxes"] == e["boxes"] and (g["width"], g["height"]) == (e["width"], e["height"])


def numpy_only_detect(model_file: Path, image_file: Path, threshold: float) -> list[dict]:
    """The spec's decoding recipe with PIL, numpy and onnxruntime alone (no layerwise, no torch)."""
    import onnxruntime
    from PIL import Image

    spec = json.loads(model_file.with_name(model_file.name + ".json").read_text())
    side, mean, std = spec["preprocessing"]["side"], spec["preprocessing"]["mean"], spec["preprocessing"]["std"]
    image = Image.open(image_file).convert("RGB")
    scale = side / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas = np.zeros((side, side, 3), np.float32)
    canvas[: resized.height, : resized.width] = np.asarray(resized, np.float32) / 255
    x = ((canvas - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    boxes, scores = (out[0] for out in session.run(None, {"images": x}))
    levels = [int(n) for n in spec["graphs"][0]["meaning"].split("levels of ")[1].split(" locations")[0].split(", ")]
    candidates = []  # (score, location, class): score > 0.05, the best 1,000 per level
    start = 0
    for size in levels:
        level = scores[start : start + size]
        flat = np.flatnonzero(level.ravel() > 0.05)
        flat = flat[np.argsort(-level.ravel()[flat], kind="stable")][:1000]
        candidates += [(level.ravel()[i], start + i // level.shape[1], i % level.shape[1]) for i in flat]
        start += size
    kept = []
    for score, location, label in sorted(candidates, key=lambda c: -c[0]):  # NMS per class at IoU 0.5
        box = boxes[location]
        if all(k[2] != label or iou(box, boxes[k[1]]) <= 0.5 for k in kept):
            kept.append((score, location, label))
    found = []
    for score, location, label in kept[:100]:
        box = np.clip(boxes[location] / scale, 0, [image.width, image.height] * 2)
        if score >= threshold:
            found.append({"label": spec["class_labels"][label], "confidence": float(score), "box": box.tolist()})
    return found


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("run_name", ["detect_run", "run_at_160", "run_with_views"])
def test_a_detector_exports_and_its_boxes_decode_without_layerwise(
    cli, request, run_name, test_scenes, tmp_path
) -> None:
    detect_run = request.getfixturevalue(run_name)
    out = tmp_path / "detector.onnx"
    code, stdout, err = cli("export", detect_run, "--out", out, "--data", test_scenes, "--json")
    assert code == 0, err
    assert json.loads(stdout)["max_abs_difference"] <= 1e-4
    spec = json.loads((tmp_path / "detector.onnx.json").read_text())
    assert spec["task"] == "detect" and "non-maximum suppression" in spec["decoding"]
    image = sorted(test_scenes.rglob("*.png"))[0]
    code, stdout, _ = cli("detect", detect_run, image, "--threshold", "0.1", "--json")
    expected = json.loads(stdout.splitlines()[0])["boxes"]
    got = numpy_only_detect(out, image, threshold=0.1)
    assert expected and [b["label"] for b in got] == [b["label"] for b in expected]
    for g, e in zip(got, expected, strict=True):
        assert abs(g["confidence"] - e["confidence"]) < 1e-3 and np.allclose(g["box"], e["box"], atol=0.05)


def test_validation_chooses_the_inference_side_and_views_and_the_run_keeps_them(detect_run) -> None:
    from layerwise.api import load
    from layerwise.models.detector import inference_sides
    from layerwise.tasks.detect import MIN_VIEWS_GAIN

    summary = json.loads((detect_run / "metrics.json").read_text())["metrics"]
    config = json.loads((detect_run / "config.json").read_text())["model"]["config"]
    by_side = summary["map_50_by_inference_side"]
    assert list(by_side) == [str(s) for s in inference_sides(128)] == ["128", "160"]
    assert inference_sides(192) == [192, 256] and inference_sides(512) == [512, 640]  # the nearest multiple of 32
    best = max(by_side, key=by_side.get)  # the first of a tie, as the task chooses
    assert summary["inference_side"] == int(best) == config["inference_side"]
    by_views = summary["map_50_by_inference_views"]
    assert list(by_views) == ["128", "160", "128+160", "128+160+128 mirrored+160 mirrored"]
    assert {k: by_views[k] for k in by_side} == by_side
    tried = {k: by_views[k] for k in list(by_views)[2:]}
    widest = max(tried, key=tried.get)
    network = load(detect_run).network
    if tried[widest] >= by_side[best] + MIN_VIEWS_GAIN:  # the views earn their cost on validation: kept
        assert summary["map_50"] == pytest.approx(tried[widest], abs=1e-6)
        assert "+".join(f"{s} mirrored" if m else str(s) for s, m in config["inference_views"]) == widest
        assert summary["inference_views"] == config["inference_views"]
    else:  # one pass at the chosen side
        assert summary["map_50"] == pytest.approx(by_side[best], abs=1e-6)
        assert config["inference_views"] is None and summary["inference_views"] == [[int(best), False]]
    assert network.inference_side == int(best)
    assert [list(view) for view in network.inference_views] == summary["inference_views"]


def test_a_resumed_run_loads_as_it_was_until_it_ends(run_at_160, scenes, tmp_path, monkeypatch) -> None:
    """--resume --epochs N of a finished run: while it trains, model.safetensors and metrics.json are the old run's,
    so config.json keeps the inference side fitted after its training; the new training settings are saved."""
    import shutil

    import layerwise.api as api

    run = shutil.copytree(run_at_160, tmp_path / "run")
    seen = []

    def log(message: str) -> None:
        if message.startswith("resuming from"):  # training has begun: the point where a kill would leave the run
            config = json.loads((run / "config.json").read_text())
            seen.append((config["model"]["config"]["inference_side"], config["train"]["epochs"]))
            seen.append(api.load(run).network.inference_side)

    monkeypatch.setattr(api, "say", log)
    api.fit(scenes, run, epochs=4, resume=True, show_progress=False)
    assert seen == [(160, 4), 160]
    assert len((run / "history.jsonl").read_text().splitlines()) == 4


def test_views_merge_the_candidates_of_each_view_mapped_back_to_the_image(detect_run, test_scenes) -> None:
    """One unmirrored view is FCOS's own forward; a mirrored view finds, on an image, what the plain view finds on
    its mirror image, flipped back; and several views find what the export's dense outputs hold (their best
    candidate), with boxes in the input's pixels."""
    from layerwise.api import load
    from layerwise.data.boxes import normalise
    from layerwise.models.detector import DenseDetections

    model = load(detect_run)
    network, prep = model.network.eval(), model.task.prep
    images = sorted(test_scenes.rglob("*.png"))[:3]
    x = normalise(torch.stack([torch.from_numpy(letterbox(p, prep.side)[0]) for p in images]), prep.mean, prep.std)
    with torch.no_grad():
        for side in (128, 160):
            network.set_inference_side(side)
            network.set_inference_views(None)
            for fcos, views in zip(network(x), network.detect_views(x, ((side, False),)), strict=True):
                assert len(fcos["boxes"]) > 0 and torch.equal(fcos["labels"], views["labels"])
                torch.testing.assert_close(fcos["boxes"], views["boxes"], atol=1e-4, rtol=0)
                torch.testing.assert_close(fcos["scores"], views["scores"])
            mirrored = network.detect_views(x, ((side, True),))
            plain_of_mirror = network.detect_views(x.flip(-1), ((side, False),))
            for found, expected in zip(mirrored, plain_of_mirror, strict=True):
                x0, y0, x1, y1 = expected["boxes"].unbind(1)
                flipped_back = torch.stack([prep.side - x1, y0, prep.side - x0, y1], 1)
                torch.testing.assert_close(found["boxes"], flipped_back, atol=1e-4, rtol=0)
                assert torch.equal(found["labels"], expected["labels"])
        network.set_inference_views([(128, False), (160, False), (128, True), (160, True)])
        found = network(x)
        dense_boxes, dense_scores = DenseDetections(network)(x)
    sizes = DenseDetections(network).level_sizes  # the plain views' levels, then the mirrored ones'
    assert dense_boxes.shape[1] == sum(sizes) and sizes[: len(sizes) // 2] == sizes[len(sizes) // 2 :]
    for i, top in enumerate(found):
        assert all(0 <= v <= prep.side for v in top["boxes"].flatten().tolist())
        score, flat = dense_scores[i].flatten().max(0)
        assert float(score) == pytest.approx(float(top["scores"][0]), abs=1e-5)
        assert int(flat) % network.num_classes == int(top["labels"][0])
        assert torch.allclose(dense_boxes[i, int(flat) // network.num_classes], top["boxes"][0], atol=1e-3)


def test_views_are_kept_when_they_beat_one_pass_by_the_margin() -> None:
    from layerwise.tasks.detect import MIN_VIEWS_GAIN, choose_inference

    both, mirrored = ((128, False), (160, False)), ((128, False), (160, False), (128, True), (160, True))
    assert choose_inference({128: 0.80, 160: 0.82}, {both: 0.82 + MIN_VIEWS_GAIN, mirrored: 0.83}) == (160, mirrored)
    assert choose_inference({128: 0.80, 160: 0.82}, {both: 0.83, mirrored: 0.83}) == (160, both)  # fewer views
    assert choose_inference({128: 0.80, 160: 0.82}, {both: 0.8249, mirrored: 0.8249}) == (160, None)
    assert choose_inference({128: 0.82, 160: 0.82}, {both: 0.80, mirrored: 0.81}) == (128, None)  # tie: training side


def test_one_side_clears_the_views_and_views_take_letterboxed_images_at_multiples_of_32() -> None:
    from layerwise.models import create_model

    network = create_model("fcos_resnet_s", num_classes=3, side=128, head_convs=1, head_levels=1,
                           inference_views=[[128, False], [160, True]])  # fmt: skip
    assert network.inference_views == ((128, False), (160, True))
    network.set_inference_side(160)
    assert network.inference_views == ((160, False),)
    with pytest.raises(ValueError, match="multiples of 32"):
        network.set_inference_views([(150, False)])
    with pytest.raises(ValueError, match="letterboxed 128 x 128"):
        network.view_input(torch.zeros(1, 3, 100, 128), (128, False))


def test_detect_uses_the_runs_views_unless_asked_for_one_pass(cli, detect_run, run_with_views, test_scenes) -> None:
    from layerwise.api import load

    assert len(load(run_with_views).network.inference_views) == 4
    image = sorted(test_scenes.rglob("*.png"))[0]
    found = {}
    for name, run, extra in (("run", detect_run, ["--single-view"]), ("views", run_with_views, []),
                             ("one pass", run_with_views, ["--single-view"])):  # fmt: skip
        code, stdout, err = cli("detect", run, image, "--threshold", "0.05", "--json", *extra)
        assert code == 0, err
        found[name] = json.loads(stdout)["boxes"]
        assert found[name] and all(0 <= v <= 128 for b in found[name] for v in b["box"])  # the image's pixels
    assert found["one pass"] == found["run"] != found["views"]


def test_a_run_detects_at_its_inference_side(cli, detect_run, run_at_160, test_scenes) -> None:
    from layerwise.api import load

    assert load(run_at_160).network.inference_side == 160
    image = sorted(test_scenes.rglob("*.png"))[0]
    found = {}
    for run in (detect_run, run_at_160):  # one pass each, whatever views detect_run's validation chose
        code, stdout, err = cli("detect", run, image, "--threshold", "0.05", "--json", "--single-view")
        assert code == 0, err
        found[run] = json.loads(stdout)["boxes"]
        assert found[run] and all(0 <= v <= 128 for b in found[run] for v in b["box"])  # the image's pixels
    if load(detect_run).network.inference_side == 128:
        assert found[detect_run] != found[run_at_160]


def test_the_inference_side_leaves_training_alone_and_export_and_explain_follow_it(detect_run, test_scenes) -> None:
    from layerwise.api import load
    from layerwise.data.boxes import normalise
    from layerwise.explain.boxes import box_score, grad_cam
    from layerwise.models import create_model
    from layerwise.models.detector import DenseDetections

    legacy = {"num_classes": 5, "side": 128, "head_convs": 1, "head_levels": 1}  # a config saved before the side
    assert create_model("fcos_resnet_s", **legacy).inference_views == ((128, False),)
    model = load(detect_run)
    network, prep = model.network, model.task.prep
    network.set_inference_views(None)  # one pass at each side in turn
    image = sorted(test_scenes.rglob("*.png"))[0]
    x = normalise(torch.from_numpy(letterbox(image, prep.side)[0])[None], prep.mean, prep.std)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([1])}]
    losses = {}
    for side in (128, 160):
        network.set_inference_side(side)
        with torch.no_grad():
            losses[side] = network.train()(x, [dict(t) for t in targets])
        network.eval()
        dense_boxes, dense_scores = DenseDetections(network)(x)
        with torch.no_grad():
            top = network(x)[0]  # sorted by score: the first is the best (location, class) pair
        score, flat = dense_scores[0].flatten().max(0)
        assert float(score) == pytest.approx(float(top["scores"][0]), abs=1e-5)
        assert int(flat) % network.num_classes == int(top["labels"][0])
        assert torch.allclose(dense_boxes[0, int(flat) // network.num_classes], top["boxes"][0], atol=1e-3)
        cam = grad_cam(network, x, top["boxes"][0], int(top["labels"][0]))
        assert cam.shape == (prep.side, prep.side) and np.isfinite(cam).all() and 0 <= cam.min() <= cam.max() <= 1
        _, last_stage = box_score(network, x, top["boxes"][0], int(top["labels"][0]))
        assert last_stage.shape[-1] == side // 16  # explained at the side it detects at (stride 16)
    assert all(torch.equal(losses[128][k], losses[160][k]) for k in losses[128])
