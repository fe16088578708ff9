"""Detection data: COCO and YOLO readers (good and bad input) and the offline demo scenes."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerwise.data.detection import looks_like_detection, read_detection, write_yolo
from layerwise.data.scenes import SCENE_CLASSES, compose_scenes, load_background_photos, plan_scene, render_scene
from layerwise.errors import InputError

SCENES = 24
SIDE = 64
SEED = 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return compose_scenes(tmp_path_factory.mktemp("scenes") / "coco", SCENES, seed=SEED, side=SIDE)


def _png(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)
    return path


def _coco(root: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    categories = categories or [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]
    root.mkdir(parents=True, exist_ok=True)
    doc = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(doc), encoding="utf-8")
    return root


def _reasons(source, origin_part: str) -> list[str]:
    return [p.reason for p in source.problems if origin_part in p.origin]


# ---------------------------------------------------------------------------------------------
# COCO and YOLO agree


def _coco_to_yolo_by_hand(coco_dir: Path, out: Path) -> Path:
    """An independent converter (not write_yolo): annotations.json -> labels/*.txt + classes.txt."""
    doc = json.loads((coco_dir / "annotations.json").read_text())
    index = {c["id"]: i for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    lines = {image["id"]: [] for image in doc["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in doc["images"]}
    for ann in doc["annotations"]:
        (x, y, w, h), (iw, ih) = ann["bbox"], sizes[ann["image_id"]]
        lines[ann["image_id"]].append(
            f"{index[ann['category_id']]} {(x + w / 2) / iw:.7f} {(y + h / 2) / ih:.7f} {w / iw:.7f} {h / ih:.7f}"
        )
    for image in doc["images"]:
        name = Path(image["file_name"]).name
        (out / "images" / "part").mkdir(parents=True, exist_ok=True)
        (out / "labels" / "part").mkdir(parents=True, exist_ok=True)
        (out / "images" / "part" / name).write_bytes((coco_dir / image["file_name"]).read_bytes())
        if lines[image["id"]]:  # negatives get no label file at all, as many YOLO tools do
            (out / "labels" / "part" / name).with_suffix(".txt").write_text("\n".join(lines[image["id"]]) + "\n")
    names = [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return out


def _assert_same_objects(a, b, atol: float) -> None:
    assert a.class_names == b.class_names
    assert [p.name for p in (i.path for i in a.images)] == [p.name for p in (i.path for i in b.images)]
    for x, y in zip(a.images, b.images, strict=True):
        assert (x.width, x.height) == (y.width, y.height)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_allclose(x.boxes, y.boxes, atol=atol, rtol=0)
    assert a.counts == b.counts


def test_coco_and_yolo_versions_of_the_same_scenes_agree(scenes, tmp_path):
    coco = read_detection(scenes)
    yolo = read_detection(_coco_to_yolo_by_hand(scenes, tmp_path / "yolo"))  # nested images/part/...
    assert (coco.format, yolo.format) == ("coco", "yolo")
    assert coco.problems == [] and yolo.problems == []
    assert coco.class_names == list(SCENE_CLASSES)
    _assert_same_objects(coco, yolo, atol=0.01)
    assert coco.images[0].boxes.dtype == np.float32 and coco.images[0].labels.dtype == np.int64


def test_write_yolo_round_trips(scenes, tmp_path):
    coco = read_detection(scenes)
    again = read_detection(write_yolo(coco, tmp_path / "yolo"))
    assert (tmp_path / "yolo" / "images" / "scene_00000.png").is_file()  # the leading images/ is not doubled
    _assert_same_objects(coco, again, atol=0.01)


def test_yolo_boxes_by_hand_with_nested_folders_and_yaml_dict(tmp_path):
    _png(tmp_path / "images" / "train" / "a.png", 40, 20)
    _png(tmp_path / "images" / "val" / "b.jpg", 40, 20)
    _png(tmp_path / "images" / "val" / "c.png", 40, 20)  # no label file: a negative
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.1 0.2\n")
    (tmp_path / "labels" / "val" / "b.txt").write_text("")  # empty: a negative
    (tmp_path / "data.yaml").write_text("path: .\nnames:\n  0: cat\n  1: dog\n")
    source = read_detection(tmp_path)
    assert source.class_names == ["cat", "dog"]
    assert [i.path.name for i in source.images] == ["a.png", "b.jpg", "c.png"]
    a = source.images[0]
    # cx 0.5 * 40 = 20, w 0.5 * 40 = 20 -> x 10..30; cy 0.5 * 20 = 10, h 0.5 * 20 = 10 -> y 5..15
    np.testing.assert_allclose(a.boxes, [[10, 5, 30, 15], [8, 3, 12, 7]], atol=1e-5)
    assert a.labels.tolist() == [1, 0]
    assert source.counts == {
        "images": 3,
        "objects": 2,
        "boxes_clipped": 0,
        "boxes_dropped": 0,
        "crowd_ignored": 0,
        "negatives": 2,
    }
    assert source.problems == []


def test_looks_like_detection(tmp_path, scenes):
    assert looks_like_detection(scenes)
    (tmp_path / "yolo" / "images").mkdir(parents=True)
    (tmp_path / "yolo" / "labels").mkdir()
    assert looks_like_detection(tmp_path / "yolo")
    _png(tmp_path / "classes" / "cat" / "1.png", 8, 8)
    assert not looks_like_detection(tmp_path / "classes")
    (tmp_path / "inst").mkdir()
    (tmp_path / "inst" / "instances_val2017.json").write_text("{}")
    assert looks_like_detection(tmp_path / "inst")


# ---------------------------------------------------------------------------------------------
# COCO bad input


def test_coco_bad_input_becomes_named_problems(tmp_path):
    root = tmp_path / "coco"
    _png(root / "images" / "ok.png", 100, 50)  # found through the images/ fallback
    _png(root / "empty.png", 30, 30)  # no annotations: a negative
    _png(root / "resized.png", 60, 40)
    (root / "broken.png").write_bytes(b"not an image at all")
    good = root / "truncated_src.png"
    _png(good, 64, 64)
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    good.unlink()
    images = [
        {"id": 1, "file_name": "ok.png", "width": 100, "height": 50},
        {"id": 2, "file_name": "missing.png"},
        {"id": 3, "file_name": "broken.png"},
        {"id": 4, "file_name": "empty.png"},
        {"id": 5, "file_name": "resized.png", "width": 120, "height": 80},
        {"id": 6, "file_name": "truncated.png"},
    ]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 10]},  # kept: dog = index 1
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [90, 40, 20, 20]},  # clipped to 90..100, 40..50
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width: dropped
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [200, 5, 10, 10]},  # outside: dropped
        {"id": 14, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 15, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # ignored
        {"id": 16, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},  # no such image
        {"id": 17, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},  # image file missing
        {"id": 18, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},  # malformed bbox
        {"id": 19, "image_id": 5, "category_id": 1, "bbox": [50, 30, 30, 30]},  # fits the JSON size, clipped to file
    ]
    source = read_detection(_coco(root, images, annotations))
    ann = f"{root / 'annotations.json'} annotation id"

    assert source.class_names == ["cat", "dog"]  # sorted by category id (1, 3)
    assert [i.path.name for i in source.images] == ["empty.png", "ok.png", "resized.png"]
    empty, ok, resized = source.images
    assert (ok.width, ok.height) == (100, 50)
    np.testing.assert_allclose(ok.boxes, [[10, 5, 30, 15], [90, 40, 100, 50]])
    assert ok.labels.tolist() == [1, 0]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert (resized.width, resized.height) == (60, 40)  # from the file's header, not the JSON
    np.testing.assert_allclose(resized.boxes, [[50, 30, 60, 40]])
    assert source.counts == {
        "images": 3,
        "objects": 3,
        "boxes_clipped": 2,
        "boxes_dropped": 2,
        "crowd_ignored": 1,
        "negatives": 1,
    }

    assert "zero or negative size" in _reasons(source, f"{ann} 12")[0]
    assert "outside the image" in _reasons(source, f"{ann} 13")[0]
    assert "category_id 7" in _reasons(source, f"{ann} 14")[0]
    assert _reasons(source, f"{ann} 15") == []
    assert "image_id 99" in _reasons(source, f"{ann} 16")[0]
    assert "bbox" in _reasons(source, f"{ann} 18")[0]
    missing = _reasons(source, str(root / "missing.png"))
    assert len(missing) == 1 and "not found" in missing[0] and "1 annotation" in missing[0]
    assert "cannot read image" in _reasons(source, str(root / "broken.png"))[0]
    assert "cannot read image" in _reasons(source, str(root / "truncated.png"))[0]
    assert "120x80 but the file is 60x40" in _reasons(source, str(root / "resized.png"))[0]
    assert len(source.problems) == 9  # one each: 12, 13, 14, 16, 18 and the four files above


def test_malformed_json_names_file_line_and_column(tmp_path):
    (tmp_path / "annotations.json").write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(InputError) as err:
        read_detection(tmp_path)
    message = str(err.value)
    assert "annotations.json" in message and "line 3" in message and "column 19" in message


def test_nothing_usable_is_an_input_error(tmp_path):
    _coco(tmp_path, [{"id": 1, "file_name": "gone.png"}], [])
    with pytest.raises(InputError, match="nothing usable.*gone.png"):
        read_detection(tmp_path)


def test_several_instances_files_are_an_input_error(tmp_path):
    for name in ("instances_train.json", "instances_val.json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(InputError, match="instances_train.json, instances_val.json"):
        read_detection(tmp_path)


# ---------------------------------------------------------------------------------------------
# YOLO bad input


def test_yolo_bad_input_becomes_named_problems(tmp_path):
    _png(tmp_path / "images" / "a.png", 100, 100)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    label = tmp_path / "labels" / "a.txt"
    label.write_text(
        "0 0.5 0.5 0.2 0.2\n"  # kept
        "1 0.5 0.5 0.2\n"  # 4 fields
        "1 0.5 0.5 0.2 0.2 0.7 0.1\n"  # 7 fields (a polygon)
        "dog 0.5 0.5 0.2 0.2\n"  # non-numeric class
        "1 0.5 half 0.2 0.2\n"  # non-numeric coordinate
        "2 0.5 0.5 0.2 0.2\n"  # class beyond the 2 names
        "1 0.95 0.5 0.2 0.2\n"  # x 85..105: clipped to 100
        "1 0.5 0.5 0 0.2\n"  # zero width: dropped
    )
    (tmp_path / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "broken.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    source = read_detection(tmp_path)

    assert [i.path.name for i in source.images] == ["a.png"]
    np.testing.assert_allclose(source.images[0].boxes, [[40, 40, 60, 60], [85, 40, 100, 60]], atol=1e-4)
    assert source.images[0].labels.tolist() == [0, 1]
    assert source.counts["boxes_clipped"] == 1 and source.counts["boxes_dropped"] == 1
    assert "found 4" in _reasons(source, f"{label} line 2")[0]
    assert "found 7" in _reasons(source, f"{label} line 3")[0]
    assert "non-numeric" in _reasons(source, f"{label} line 4")[0]
    assert "non-numeric" in _reasons(source, f"{label} line 5")[0]
    assert "class id 2 is beyond the 2 names in classes.txt" in _reasons(source, f"{label} line 6")[0]
    assert _reasons(source, f"{label} line 7") == []
    assert "zero or negative size" in _reasons(source, f"{label} line 8")[0]
    assert "no image" in _reasons(source, str(tmp_path / "labels" / "orphan.txt"))[0]
    assert "cannot read image" in _reasons(source, str(tmp_path / "images" / "broken.jpg"))[0]
    # broken.jpg's label file belongs to an image, just not a readable one: no orphan problem
    assert _reasons(source, str(tmp_path / "labels" / "broken.txt")) == []
    assert len(source.problems) == 8


def test_yolo_without_class_names_says_what_is_expected(tmp_path):
    _png(tmp_path / "images" / "a.png", 10, 10)
    (tmp_path / "labels").mkdir()
    with pytest.raises(InputError, match="data.yaml.*classes.txt"):
        read_detection(tmp_path)


def test_yolo_classes_txt_inside_labels_is_not_a_label_file(tmp_path):
    _png(tmp_path / "images" / "a.png", 10, 10)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "classes.txt").write_text("cat\n")  # where LabelImg writes it
    source = read_detection(tmp_path)
    assert source.class_names == ["cat"] and source.problems == []


# ---------------------------------------------------------------------------------------------
# Demo scenes


def test_scene_boxes_are_the_pasted_objects_masks(scenes):
    from layerwise.data.scenes import _object_pools

    source = read_detection(scenes)
    glyphs, pools = _object_pools("train", SCENE_CLASSES)
    photos = load_background_photos()
    isolated = 0
    for index, image in enumerate(source.images):
        scene = plan_scene(index, SEED, SIDE, 4, glyphs, pools, photos)
        pixels = np.asarray(Image.open(image.path))  # (SIDE, SIDE, 3) uint8
        np.testing.assert_array_equal(pixels, render_scene(scene))
        np.testing.assert_array_equal(image.boxes, [obj.box for obj in scene.objects] or np.zeros((0, 4)))
        changed = np.any(pixels != scene.background, axis=2)  # (SIDE, SIDE)
        inside = np.zeros_like(changed)
        for x0, y0, x1, y1 in image.boxes.astype(int):
            inside[y0:y1, x0:x1] = True
        assert not np.any(changed & ~inside), f"{image.path}: pixels changed outside every box"
        for k, obj in enumerate(scene.objects):
            # The object's own mask, placed in the frame, touches all four sides of its box.
            full = np.zeros((SIDE, SIDE), bool)
            x0, y0, x1, y1 = obj.box
            full[y0:y1, x0:x1] = obj.alpha > 0
            rows, cols = np.nonzero(full)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == obj.box
            others = [o.box for j, o in enumerate(scene.objects) if j != k]
            if all(min(x1, b[2]) <= max(x0, b[0]) or min(y1, b[3]) <= max(y0, b[1]) for b in others):
                # Alone in its box, the visible change spans the box (within a pixel where a faint
                # edge pixel blends to the background's own value).
                rows, cols = np.nonzero(changed[y0:y1, x0:x1])
                assert cols.min() <= 1 and rows.min() <= 1
                assert cols.max() >= x1 - x0 - 2 and rows.max() >= y1 - y0 - 2
                isolated += 1
    assert isolated >= 10


def test_scenes_have_negatives_and_every_class(scenes):
    source = read_detection(scenes)
    assert source.counts["images"] == SCENES
    assert 1 <= source.counts["negatives"] < SCENES // 2
    assert set(np.concatenate([i.labels for i in source.images]).tolist()) == set(range(len(SCENE_CLASSES)))
    sizes = np.concatenate(
        [np.maximum(i.boxes[:, 2] - i.boxes[:, 0], i.boxes[:, 3] - i.boxes[:, 1]) for i in source.images]
    )
    assert sizes.min() >= 0.18 * SIDE - 2 and sizes.max() <= 0.45 * SIDE + 2  # longer side as specified
    assert all(i.width == SIDE and i.height == SIDE for i in source.images)


def test_compose_scenes_is_idempotent_and_deterministic(scenes, tmp_path):
    files = [scenes / "annotations.json", scenes / "images" / "scene_00000.png"]
    before = [f.stat().st_mtime_ns for f in files]
    assert compose_scenes(scenes.parent / "coco", SCENES, seed=SEED, side=SIDE) == scenes
    assert [f.stat().st_mtime_ns for f in files] == before

    again = compose_scenes(tmp_path / "again", 6, seed=SEED, side=SIDE)
    for name in ("scene_00000.png", "scene_00005.png"):  # a smaller run is a prefix of a larger one
        assert (again / "images" / name).read_bytes() == (scenes / "images" / name).read_bytes()
    other = compose_scenes(tmp_path / "other", 6, seed=SEED + 1, side=SIDE)
    assert (other / "images" / "scene_00000.png").read_bytes() != (again / "images" / "scene_00000.png").read_bytes()

    # Different arguments rebuild the folder in place.
    rebuilt = compose_scenes(tmp_path / "again", 7, seed=SEED, side=SIDE)
    assert len(read_detection(rebuilt).images) == 7
