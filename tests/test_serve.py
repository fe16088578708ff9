"""`layerwise serve`: a real server on 127.0.0.1, talked to over real HTTP (httpx)."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


@contextmanager
def running_server(run: Path, **options):
    """uvicorn serving `run` on a free loopback port in a background thread; yields its base URL."""
    import uvicorn

    import layerwise
    from layerwise.serve.app import ServeConfig, create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(layerwise.load(run), ServeConfig(**options), run)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def upload(*paths: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_predict_health_model_and_concurrent_requests(cli, three_class_run, fashion_test) -> None:
    files = [next((fashion_test / name).glob("*.png")) for name in ("bag", "sneaker", "trouser")]
    code, stdout, _ = cli("predict", three_class_run, *files, "--json")
    expected = [json.loads(line) for line in stdout.splitlines()]
    with running_server(three_class_run, max_wait_ms=20) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        info = httpx.get(f"{url}/model").json()
        assert info["task"] == "classify" and info["labels"] == ["bag", "sneaker", "trouser"]
        answer = httpx.post(f"{url}/predict", files=upload(*files))
        assert answer.status_code == 200
        got = answer.json()["predictions"]
        assert [g["path"] for g in got] == [f.name for f in files]  # the upload's name, echoed back only
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert g["confidence"] == pytest.approx(e["confidence"], abs=1e-5)

        def one(i: int):
            return httpx.post(f"{url}/predict", files=upload(files[i % 3]), timeout=30)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(48)))
        assert all(a.status_code == 200 for a in answers)
        assert [a.json()["predictions"][0]["label"] for a in answers] == [expected[i % 3]["label"] for i in range(48)]
        assert httpx.get(f"{url}/docs").status_code == 200


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(three_class_run, fashion_test, tmp_path) -> None:
    good = next((fashion_test / "bag").glob("*.png"))
    key_file = "s3cret"
    with running_server(three_class_run, max_inputs=2, max_body_bytes=200_000, api_key=key_file) as url:
        key = {"X-API-Key": "s3cret"}
        cases = [
            (httpx.post(f"{url}/predict", files=upload(good)), 401),
            (httpx.post(f"{url}/predict", files=upload(good), headers={"X-API-Key": "wrong"}), 401),
            (
                httpx.post(f"{url}/predict", files=[("files", ("x.png", b"\x89PNG broken", "image/png"))], headers=key),
                422,
            ),
            (httpx.post(f"{url}/predict", content=b"raw", headers=key | {"content-type": "text/plain"}), 415),
            (httpx.post(f"{url}/predict", json={"texts": ["hello"]}, headers=key), 400),
            (httpx.post(f"{url}/predict", files=upload(good, good, good), headers=key), 400),
            (
                httpx.post(f"{url}/predict", files=[("files", ("big.png", b"0" * 300_000, "image/png"))], headers=key),
                413,
            ),
            (httpx.post(f"{url}/predict", files={"note": (None, "no files")}, headers=key), 400),
            (httpx.post(f"{url}/generate", json={"prompt": "x"}, headers=key), 400),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert isinstance(response.json()["error"], str) and response.json()["error"]
        sneaky = [("files", ("../../escape.png", good.read_bytes(), "image/png"))]
        answer = httpx.post(f"{url}/predict", files=sneaky, headers=key)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["path"] == "../../escape.png"
        assert not Path("../../escape.png").exists() and not Path("/escape.png").exists()
        assert httpx.get(f"{url}/health").status_code == 200  # no key needed
        assert httpx.post(f"{url}/predict", files=upload(good), headers=key).status_code == 200
        assert not any(p.name.startswith("x.png") for p in tmp_path.iterdir())


def test_generate_runs_answer_and_stream(tiny_generate_run) -> None:
    run = tiny_generate_run
    with running_server(run) as url:
        body = {"prompt": "The computer", "max_new_tokens": 12, "temperature": 0, "seed": 1}
        answer = httpx.post(f"{url}/generate", json=body, timeout=30).json()
        assert answer["new_tokens"] == 12 and answer["prompt"] == "The computer"
        events = httpx.post(f"{url}/generate", json=body | {"stream": True}, timeout=30).text
        pieces = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: ")]
        assert "event: done" in events and "".join(pieces[:-1]) == answer["text"]
        assert httpx.post(f"{url}/predict", json={"texts": ["x"]}).status_code == 400
        assert httpx.post(f"{url}/generate", json={"prompt": ""}).status_code == 400


def test_the_serve_command_runs_worker_processes(three_class_run, fashion_test) -> None:
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "layerwise",
        "serve",
        str(three_class_run),
        "--port",
        str(port),
        "--workers",
        "2",
        "--runtime",
        "torch",
    ]  # ONNX in workers costs an export at start-up; tested below
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        image = next((fashion_test / "bag").glob("*.png"))
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", files=upload(image), timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in ("bag", "sneaker", "trouser")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_onnx_runtime_answers_like_pytorch(three_class_run, fashion_test, tmp_path) -> None:
    """`serve --runtime auto` runs classifiers on ONNX Runtime: same labels, confidences and OOD flags."""
    import layerwise
    from layerwise.serve.onnx_network import export_for_serving

    onnx_model = tmp_path / "model.onnx"
    assert export_for_serving(layerwise.load(three_class_run), onnx_model) is None
    files = [p for name in ("bag", "sneaker", "trouser") for p in sorted((fashion_test / name).glob("*.png"))[:3]]
    answers = {}
    for runtime, options in (("pytorch", {}), ("onnxruntime", {"onnx_model": str(onnx_model)})):
        with running_server(three_class_run, **options) as url:
            assert httpx.get(f"{url}/model").json()["runtime"] == runtime
            answers[runtime] = httpx.post(f"{url}/predict", files=upload(*files)).json()["predictions"]
    for torch_answer, onnx_answer in zip(answers["pytorch"], answers["onnxruntime"], strict=True):
        assert onnx_answer["label"] == torch_answer["label"]
        assert onnx_answer["confidence"] == pytest.approx(torch_answer["confidence"], abs=1e-4)
        assert onnx_answer.get("ood") == torch_answer.get("ood")
        assert onnx_answer.get("ood_score", 0) == pytest.approx(torch_answer.get("ood_score", 0), rel=1e-3, abs=1e-3)
