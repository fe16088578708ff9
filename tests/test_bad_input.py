"""Bad input through the CLI: exit code 2, a message naming the file or field, no traceback."""

import shutil
from pathlib import Path

import pytest


def copy_classes(src: Path, dst: Path, classes: list[str], per_class: int) -> Path:
    for name in classes:
        (dst / name).mkdir(parents=True)
        for f in sorted((src / name).glob("*.png"))[:per_class]:
            shutil.copy(f, dst / name / f.name)
    return dst


@pytest.fixture
def small_images(fashion_train, tmp_path) -> Path:
    return copy_classes(fashion_train, tmp_path / "data", ["bag", "trouser", "sneaker"], 20)


def assert_input_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    flat = " ".join(err.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {flat!r}"


def test_broken_files_are_skipped_listed_and_kept(cli, small_images, tmp_path) -> None:
    (small_images / "bag" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (small_images / "bag" / "empty.jpg").write_bytes(b"")
    (small_images / "trouser" / "notes.md").write_text("not an image")
    run = tmp_path / "run"
    code, _, err = cli("train", small_images, "--out", run, "--epochs", "1", "--no-progress")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "skipped 3" in flat
    for name in ("corrupt.png", "empty.jpg", "notes.md"):
        assert name in flat
    import json

    skipped = json.loads((run / "problems.json").read_text())["skipped"]
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "unknown file type" in reasons["notes.md"]
    assert "image" in reasons["corrupt.png"]


def test_a_single_class_stops_before_training(cli, fashion_train, tmp_path) -> None:
    data = copy_classes(fashion_train, tmp_path / "one", ["bag"], 10)
    assert_input_error(cli("train", data, "--out", tmp_path / "run", "--no-progress"), "at least 2 classes")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_empty_folder(cli, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert_input_error(
        cli("train", tmp_path / "empty", "--out", tmp_path / "run"), str(tmp_path / "empty"), "no class folders"
    )


def test_a_class_folder_with_no_usable_files(cli, small_images, tmp_path) -> None:
    (small_images / "broken_class").mkdir()
    (small_images / "broken_class" / "a.png").write_bytes(b"nope")
    assert_input_error(
        cli("train", small_images, "--out", tmp_path / "run", "--no-progress"), "'broken_class'", "no usable examples"
    )


def test_an_empty_class_folder(cli, small_images, tmp_path) -> None:
    (small_images / "nothing_here").mkdir()
    assert_input_error(cli("train", small_images, "--out", tmp_path / "run"), "nothing_here", "empty")


def test_csv_without_label_column(cli, tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("text,topic\nhello there,a\n")
    assert_input_error(
        cli("train", manifest, "--out", tmp_path / "run"), str(manifest), "no 'label' column", "text, topic"
    )


def test_csv_rows_with_problems_are_named_by_line(cli, tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    rows = ["path,label"] + [f"img{i}.png,{'a' if i % 2 else 'b'}" for i in range(4)] + ["missing.png,a", "img0.png,"]
    manifest.write_text("\n".join(rows) + "\n")
    from PIL import Image

    for i in range(4):
        Image.new("L", (8, 8), color=i * 60).save(tmp_path / f"img{i}.png")
    code, _, err = cli("train", manifest, "--out", tmp_path / "run", "--epochs", "1", "--no-progress")
    flat = " ".join(err.split())
    assert f"{manifest} line 6: file not found: missing.png" in flat
    assert f"{manifest} line 7: empty label" in flat
    assert code == 0, err


def test_csv_row_with_empty_text(cli, tmp_path) -> None:
    manifest = tmp_path / "t.csv"
    manifest.write_text(
        "text,label\n" + "".join(f"quote number {i} here,{'x' if i % 2 else 'y'}\n" for i in range(20)) + '"",x\n'
    )
    code, _, err = cli("train", manifest, "--out", tmp_path / "run", "--epochs", "1", "--no-progress")
    assert code == 0, err
    assert f"{manifest} line 22: empty text" in " ".join(err.split())


def test_missing_data_path(cli, tmp_path) -> None:
    assert_input_error(
        cli("train", tmp_path / "nope", "--out", tmp_path / "run"), str(tmp_path / "nope"), "no such file"
    )


def test_unknown_model_and_bad_fraction(cli, small_images, tmp_path) -> None:
    assert_input_error(cli("train", small_images, "--out", tmp_path / "r1", "--model", "gpt9"), "unknown model 'gpt9'")
    assert_input_error(cli("train", small_images, "--out", tmp_path / "r2", "--val-fraction", "0.9"), "--val-fraction")
    assert_input_error(
        cli("train", small_images, "--out", tmp_path / "r3", "--model", "transformer_tiny"), "does not take image"
    )


def test_loading_something_that_is_not_a_run(cli, tmp_path, small_images) -> None:
    assert_input_error(cli("predict", tmp_path, small_images), "config.json", "not found")
