"""`layerwise export RUN --format onnx --out FILE`: a model file that runs without layerwise."""

import json
from pathlib import Path

import numpy as np


def numpy_only_predict(model_file: Path, image_file: Path) -> str:
    """What the README shows: PIL + numpy + onnxruntime and the spec file, no layerwise."""
    import onnxruntime
    from PIL import Image

    spec = json.loads(model_file.with_name(model_file.name + ".json").read_text())
    prep = spec["preprocessing"]
    image = Image.open(image_file).convert("L" if prep["channels"] == 1 else "RGB")
    image = image.resize((prep["side"], prep["side"]), Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = np.asarray(image, dtype=np.float32) / 255
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    mean, std = np.array(prep["mean"], np.float32), np.array(prep["std"], np.float32)
    x = ((pixels - mean[:, None, None]) / std[:, None, None])[None]
    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {spec["input"]["name"]: x})[0]
    return spec["class_labels"][int(logits[0].argmax())]


def test_an_image_run_exports_and_runs_without_layerwise(cli, three_class_run, fashion_test, tmp_path) -> None:
    out = tmp_path / "model.onnx"
    code, stdout, err = cli("export", three_class_run, "--out", out, "--data", fashion_test, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["max_abs_difference"] <= 1e-4 and "inputs from" in result["parity_inputs"]
    spec = json.loads((tmp_path / "model.onnx.json").read_text())
    assert spec["input"]["shape"][0] == "batch" and spec["class_labels"] == ["bag", "sneaker", "trouser"]
    files = [next((fashion_test / name).glob("*.png")) for name in ("bag", "sneaker", "trouser")]
    code, stdout, _ = cli("predict", three_class_run, *files, "--json")
    expected = [json.loads(line)["label"] for line in stdout.splitlines()]
    assert [numpy_only_predict(out, f) for f in files] == expected


def test_a_generate_run_exports_with_dynamic_batch_and_length(cli, tiny_generate_run, tmp_path) -> None:
    import onnxruntime
    import torch

    import layerwise

    run = tiny_generate_run
    out = tmp_path / "gpt.onnx"
    code, _, err = cli("export", run, "--out", out)
    assert code == 0, err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    network = layerwise.load(run).network.eval().cpu()
    for shape in [(1, 5), (3, 17)]:
        ids = torch.randint(1, 200, shape)
        expected = network(ids).detach().numpy()
        got = session.run(None, {"input": ids.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


def test_bad_export_requests_are_clear(cli, three_class_run, tmp_path) -> None:
    code, _, err = cli("export", three_class_run, "--out", tmp_path / "m.pt", "--format", "torchscript")
    assert code == 2 and "only onnx" in err
    code, _, err = cli("export", three_class_run, "--out", tmp_path / "m.onnx", "--data", tmp_path / "missing")
    assert code == 2 and "missing: not found" in err
