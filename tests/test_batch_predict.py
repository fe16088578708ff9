"""`layerwise predict RUN DIR --out FILE.jsonl [--resume]`: a folder of any size, streamed in chunks."""

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture
def folder(fashion_test, tmp_path) -> Path:
    """24 test images in nested folders, and one broken file."""
    root = tmp_path / "inbox"
    for name in ("bag", "trouser"):
        shutil.copytree(fashion_test / name, root / "sub" / name)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_streams_to_a_jsonl_file(cli, three_class_run, folder, tmp_path) -> None:
    out = tmp_path / "predictions.jsonl"
    code, stdout, err = cli("predict", three_class_run, folder, "--out", out)
    assert code == 2  # the broken file
    rows = lines(out)
    files = sorted(str(p) for p in folder.rglob("*.png"))
    assert sorted(r["path"] for r in rows) == files
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert "error" in broken and "label" not in broken
    good = [r for r in rows if "label" in r]
    assert len(good) == len(files) - 1 and all(0 < r["confidence"] <= 1 for r in good)
    assert "wrote" in err and stdout == ""


def test_resume_skips_what_is_written_and_mends_a_torn_line(cli, three_class_run, folder, tmp_path) -> None:
    full = tmp_path / "full.jsonl"
    cli("predict", three_class_run, folder, "--out", full)
    partial = tmp_path / "partial.jsonl"
    kept = full.read_text().splitlines()[:7]
    partial.write_text("\n".join(kept) + "\n" + '{"path": "torn')  # killed in the middle of line 8
    before = partial.read_text()
    code, _, err = cli("predict", three_class_run, folder, "--out", partial)
    assert code == 2 and "--resume" in err and partial.read_text() == before  # refused, untouched
    code, _, err = cli("predict", three_class_run, folder, "--out", partial, "--resume")
    assert "7 input(s) already in" in err
    assert sorted(map(json.dumps, lines(partial))) == sorted(map(json.dumps, lines(full)))


def test_chunks_give_the_same_predictions_as_one_batch(three_class_run, folder) -> None:
    import layerwise

    model = layerwise.load(three_class_run)
    examples, _ = model.find_inputs([folder])
    whole = [
        r.to_json() if hasattr(r, "to_json") else r.reason for r in model.task.predict_stream(model.network, examples)
    ]
    chunked = [
        r.to_json() if hasattr(r, "to_json") else r.reason
        for r in model.task.predict_stream(model.network, examples, chunk=5)
    ]
    assert chunked == whole and len(whole) == len(examples)
