"""Unit tests for discovery (class folders, CSV manifests) and the checks that stop a bad run early.

Every fixture file is written here, tiny, under tmp_path. A skipped input must be named (its path or
its CSV line) together with the reason, so the messages are asserted, not just the counts.
"""

from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from layerwise.data.frontend import fit_frontend
from layerwise.data.sources import Problem, Source, check_trainable, discover, discover_files
from layerwise.errors import InputError


def write_png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def write_wav(path: Path, seconds: float = 0.1, rate: int = 8000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    soundfile.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), rate)
    return path


def image_tree(root: Path, classes: dict[str, int]) -> Path:
    """root/<class>/<i>.png, `n` small images per class, each class a different grey."""
    for k, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_png(root / name / f"{i}.png", value=40 * k + i)
    return root


def reasons(problems: list[Problem]) -> dict[str, str]:
    """origin -> reason, with origins shortened to the file name (or 'data.csv line N')."""
    return {Path(p.origin).name: p.reason for p in problems}


def decoded(source: Source) -> tuple[list[str], list[Problem]]:
    """What a training run sees: labels of the decodable examples, and every skipped input."""
    frontend = fit_frontend(source.modality, source.examples)
    _, kept, problems = frontend.decode_all(source.examples)
    return [source.examples[i].label for i in kept], source.problems + problems


# --- class folders ---------------------------------------------------------------------------


def test_class_folders_give_one_labelled_example_per_file(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 3})
    source = discover(root)
    assert source.modality == "image"
    assert source.class_names == ["cat", "dog"]
    assert source.labels == ["cat", "cat", "dog", "dog", "dog"]
    assert [ex.path for ex in source.examples] == [
        root / "cat" / "0.png",
        root / "cat" / "1.png",
        root / "dog" / "0.png",
        root / "dog" / "1.png",
        root / "dog" / "2.png",
    ]
    assert source.problems == []


def test_files_in_nested_folders_belong_to_their_class(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 1, "dog": 1})
    write_png(root / "cat" / "indoor" / "sofa.png")
    assert discover(root).labels == ["cat", "cat", "dog"]


def test_corrupt_image_is_skipped_by_path_with_reason(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    rng = np.random.default_rng(0)
    corrupt = root / "cat" / "corrupt.png"
    corrupt.write_bytes(rng.bytes(300))
    labels, problems = decoded(discover(root))
    assert labels == ["cat", "cat", "dog", "dog"]
    assert [p.origin for p in problems] == [str(corrupt)]
    assert "image" in problems[0].reason


def test_zero_byte_file_is_skipped_as_empty(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "dog" / "empty.jpg").write_bytes(b"")
    labels, problems = decoded(discover(root))
    assert labels == ["cat", "cat", "dog", "dog"]
    assert reasons(problems) == {"empty.jpg": "empty file (0 bytes)"}


def test_non_media_file_is_an_unknown_file_type(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "cat" / "notes.md").write_text("taken on my phone")
    source = discover(root)
    assert len(source.examples) == 4
    assert reasons(source.problems) == {"notes.md": "unknown file type '.md'"}
    assert source.problems[0].origin == str(root / "cat" / "notes.md")


def test_audio_file_in_an_image_dataset_is_skipped(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    write_wav(root / "dog" / "bark.wav")
    source = discover(root)
    assert source.modality == "image"
    assert source.labels == ["cat", "cat", "dog", "dog"]
    assert reasons(source.problems) == {"bark.wav": "audio file in an image dataset"}


def test_file_outside_class_folders_is_named(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 1, "dog": 1})
    write_png(root / "stray.png")
    source = discover(root)
    assert source.labels == ["cat", "dog"]
    assert reasons(source.problems) == {"stray.png": "file outside any class folder"}


def test_hidden_files_and_folders_are_not_data(tmp_path: Path) -> None:
    root = image_tree(tmp_path / ".cache" / "data", {"cat": 1, "dog": 1})  # hidden parent: fine
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    write_png(root / ".git" / "objects" / "x.png")  # not a class
    write_png(root / "dog" / ".thumbnails" / "large" / "0.png")  # hidden two levels up
    source = discover(root)
    assert source.class_names == ["cat", "dog"]
    assert source.labels == ["cat", "dog"]
    assert source.problems == []


def test_a_hidden_folder_named_explicitly_is_searched(tmp_path: Path) -> None:
    root = tmp_path / ".inbox"
    write_png(root / "a.png")
    write_png(root / "sub" / "b.png")
    write_png(root / "sub" / ".trash" / "c.png")
    source = discover(root, labelled=False)
    assert [ex.path for ex in source.examples] == [root / "a.png", root / "sub" / "b.png"]


def test_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match="no class folders found") as err:
        discover(tmp_path / "data")
    assert str(tmp_path / "data") in str(err.value)


def test_empty_class_folder_is_an_input_error_naming_the_class(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / ".DS_Store").write_bytes(b"\x00")  # hidden files do not count
    with pytest.raises(InputError, match="class folder 'dog' is empty"):
        discover(root)


def test_missing_data_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or directory"):
        discover(tmp_path / "nowhere")
    with pytest.raises(InputError, match="expected a folder of class folders or a .csv"):
        discover(write_png(tmp_path / "one.png"))


def test_folder_with_no_usable_files_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "a.md").write_text("x")
    with pytest.raises(InputError, match="no usable files"):
        discover(tmp_path / "data")


# --- modality ------------------------------------------------------------------------------


def test_modality_is_the_majority_file_type(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("yes", "no"):
        write_wav(root / name / "1.wav")
        write_wav(root / name / "2.flac")
    write_png(root / "yes" / "cover.png")
    source = discover(root)
    assert source.modality == "audio"
    assert source.labels == ["no", "no", "yes", "yes"]
    assert reasons(source.problems) == {"cover.png": "image file in an audio dataset"}


def test_modality_override_keeps_the_minority(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("yes", "no"):
        write_wav(root / name / "1.wav")
        write_png(root / name / "cover.png")
    write_wav(root / "yes" / "2.ogg")
    source = discover(root, modality="image")
    assert source.modality == "image"
    assert [ex.path.name for ex in source.examples] == ["cover.png", "cover.png"]
    assert sorted(reasons(source.problems).values()) == ["audio file in an image dataset"] * 2
    with pytest.raises(InputError, match="--modality must be one of image, audio, text"):
        discover(root, modality="video")


# --- CSV manifests -----------------------------------------------------------------------------


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_text_rows(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", 'label,text\npos,good film\nneg,"bad, slow"\n')
    source = discover(manifest)
    assert source.modality == "text"
    assert [(ex.label, ex.text) for ex in source.examples] == [
        ("pos", "good film"),
        ("neg", "bad, slow"),
    ]
    assert [ex.origin for ex in source.examples] == [f"{manifest} line 2", f"{manifest} line 3"]


def test_csv_row_with_empty_text_is_named_by_line(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "label,text\npos,good\nneg,   \nneg,bad\n")
    source = discover(manifest)
    assert source.labels == ["pos", "neg"]
    assert source.problems == [Problem(f"{manifest} line 3", "empty text")]


def test_csv_row_with_missing_label_is_named_by_line(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "text,label\ngood,pos\nbad,\nugly\n")
    source = discover(manifest)
    assert source.labels == ["pos"]
    assert source.problems == [
        Problem(f"{manifest} line 3", "empty label"),
        Problem(f"{manifest} line 4", "empty label"),
    ]


def test_csv_without_label_column_names_the_csv_and_columns(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "file,text\na.png,hello\n")
    with pytest.raises(InputError) as err:
        discover(manifest)
    assert str(manifest) in str(err.value)
    assert "no 'label' column (columns found: file, text)" in str(err.value)


def test_csv_without_path_or_text_column(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "label,file\ncat,a.png\n")
    with pytest.raises(InputError) as err:
        discover(manifest)
    assert "needs a 'path' column" in str(err.value)
    assert "(columns found: label, file)" in str(err.value)


def test_csv_paths_are_relative_to_the_csv(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "project"
    write_png(root / "images" / "a.png")
    write_png(root / "images" / "b.png")
    manifest = write_csv(root / "meta" / "data.csv", "path,label\n../images/a.png,cat\n../images/b.png ,dog\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resolving against the working directory would find nothing
    source = discover(manifest)
    assert [ex.path for ex in source.examples] == [
        (root / "images" / "a.png").resolve(),
        (root / "images" / "b.png").resolve(),
    ]
    assert source.labels == ["cat", "dog"]
    assert source.problems == []
    assert source.examples[0].origin.endswith(f"({manifest} line 2)")


def test_csv_path_that_does_not_exist_is_named_by_line(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "data.csv", "path,label\na.png,cat\nmissing.png,dog\n,dog\n")
    source = discover(manifest)
    assert source.labels == ["cat"]
    assert source.problems == [
        Problem(f"{manifest} line 3", "file not found: missing.png"),
        Problem(f"{manifest} line 4", "empty path"),
    ]


def test_csv_with_utf8_bom_header(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "label,text\nfr,café\n", encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    source = discover(manifest)
    assert [(ex.label, ex.text) for ex in source.examples] == [("fr", "café")]


def test_csv_that_is_not_utf8_is_an_input_error(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "label,text\nfr,café\n", encoding="latin-1")
    with pytest.raises(InputError, match="not UTF-8"):
        discover(manifest)


def test_csv_line_numbers_count_blank_lines_and_quoted_newlines(tmp_path: Path) -> None:
    text = 'label,text\na,one\n\nb,"two\nlines"\nc,\nd,x\u2028y\n'
    manifest = write_csv(tmp_path / "data.csv", text)
    source = discover(manifest)
    # A quoted newline and U+2028 are part of the text, not row breaks.
    assert [ex.text for ex in source.examples] == ["one", "two\nlines", "x\u2028y"]
    assert source.problems == [Problem(f"{manifest} line 6", "empty text")]  # 'c,' is on line 6


def test_csv_with_an_oversized_field_is_an_input_error_naming_the_line(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "data.csv", "label,text\na,ok\nb," + "x" * 200_000 + "\n")
    with pytest.raises(InputError, match=r"data\.csv line 3: malformed CSV"):
        discover(manifest)


def test_csv_class_whose_rows_all_fail_is_still_a_class(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    manifest = write_csv(tmp_path / "data.csv", "path,label\na.png,cat\nb.png,dog\ngone.png,bird\n")
    source = discover(manifest)
    assert source.class_names == ["bird", "cat", "dog"]
    with pytest.raises(InputError, match="class 'bird' has no usable examples"):
        check_trainable(source.labels, source.class_names, source.root)


# --- can it train? -------------------------------------------------------------------------


def test_single_class_cannot_train(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 3})
    source = discover(root)
    with pytest.raises(InputError, match=r"need at least 2 classes with usable examples \(only 'cat'\)"):
        check_trainable(source.labels, source.class_names, source.root)


def test_nothing_usable_cannot_train(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="need at least 2 classes"):
        check_trainable([], [], tmp_path)


def test_class_with_only_unusable_files_is_named(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "bird").mkdir()
    (root / "bird" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "bird" / "notes.md").write_text("x")
    source = discover(root)
    assert source.class_names == ["bird", "cat", "dog"]
    labels, problems = decoded(source)
    assert reasons(problems).keys() == {"broken.png", "notes.md"}
    with pytest.raises(InputError) as err:
        check_trainable(labels, source.class_names, source.root)
    assert "class 'bird' has no usable examples" in str(err.value)
    assert str(root) in str(err.value)


def test_two_usable_classes_can_train(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"cat": 1, "dog": 1})
    source = discover(root)
    check_trainable(source.labels, source.class_names, source.root)  # does not raise


# --- unlabelled inputs for prediction -------------------------------------------------------


def test_discover_files_takes_files_and_folders(tmp_path: Path) -> None:
    single = write_png(tmp_path / "one.png")
    folder = tmp_path / "more"
    write_png(folder / "b.png")
    write_png(folder / "deeper" / "a.png")
    (folder / "readme.txt").write_text("not an image")
    source = discover_files([single, folder])
    assert source.modality == "image"
    assert [ex.path for ex in source.examples] == [
        single,
        folder / "b.png",
        folder / "deeper" / "a.png",
    ]
    assert all(ex.label is None for ex in source.examples)
    assert reasons(source.problems) == {"readme.txt": "text file in an image dataset"}
    with pytest.raises(InputError, match="no such file or directory"):
        discover_files([tmp_path / "nowhere.png"])
