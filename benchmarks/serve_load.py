"""How much load does `layerwise serve` take, and what does micro-batching buy?

Trains (once, cached under .cache/bench) a convnet_s on 3 Fashion-MNIST classes, starts `layerwise
serve` as a separate process on 127.0.0.1, and runs N concurrent clients (threads with httpx, one
28x28 PNG per request) for a bounded time against it: requests/s, p50/p99 latency, errors (must be
0), and the server's RSS before and after (no growth). Then the same with micro-batching off
(--max-batch 1), and prints the ratio. Finally ONNX Runtime vs PyTorch inference throughput on the
same network (batch 1 and 32) as a ratio. Only loopback traffic; every loop is bounded in time.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from layerwise.data.datasets import prepare_fashion_mnist
from layerwise.demo import default_cache

BENCH_DIR = Path(".cache/bench")


def trained_run() -> tuple[Path, Path]:
    data_root = prepare_fashion_mnist(default_cache() / "fashion-mnist-bench", "train", per_class=200)
    test_root = prepare_fashion_mnist(default_cache() / "fashion-mnist-bench", "test", per_class=20)
    run = BENCH_DIR / "serve-run"
    if not (run / "metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        data = BENCH_DIR / "serve-data"
        shutil.rmtree(data, ignore_errors=True)
        for name in ("bag", "sneaker", "trouser"):
            shutil.copytree(data_root / name, data / name)
        subprocess.run([sys.executable, "-m", "layerwise", "train", str(data), "--out", str(run), "--epochs", "3",
                        "--no-progress"], check=True, capture_output=True)  # fmt: skip
    return run, next((test_root / "bag").glob("*.png"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(run: Path, image: Path, clients: int, seconds: float, max_batch: int) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "layerwise", "serve", str(run), "--port", str(port), "--max-batch", str(max_batch)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        body = image.read_bytes()
        files = [("files", (image.name, body, "image/png"))]
        for _ in range(20):  # warm-up
            httpx.post(f"{url}/predict", files=files, timeout=30)
        rss_before = rss_mb(server.pid)
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def client() -> None:
            with httpx.Client(timeout=30) as session:
                while time.monotonic() < stop_at:
                    started = time.perf_counter()
                    try:
                        ok = session.post(f"{url}/predict", files=files).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        errors[0] += 0 if ok else 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        return {
            "rps": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "errors": errors[0],
            "rss_before": rss_before,
            "rss_after": rss_mb(server.pid),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def onnx_vs_torch(run: Path) -> None:
    import onnxruntime

    import layerwise
    from layerwise.serve.export import export_onnx

    bundle = layerwise.load(run)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(bundle, Path(tmp) / "m.onnx")
        session = onnxruntime.InferenceSession(str(Path(tmp) / "m.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 32):
            x = torch.randn(batch, 1, 28, 28)
            rates = {}
            for name, fn in {
                "onnxruntime": lambda x=x: session.run(None, {"input": x.numpy()}),
                "pytorch": lambda x=x: bundle.network(x),
            }.items():
                with torch.no_grad():
                    for _ in range(10):
                        fn()
                    started, n = time.perf_counter(), 0
                    while time.perf_counter() - started < 2:
                        fn()
                        n += 1
                rates[name] = n * batch / (time.perf_counter() - started)
            print(f"batch {batch}: onnxruntime {rates['onnxruntime']:,.0f} img/s, pytorch {rates['pytorch']:,.0f} "
                  f"img/s, ratio {rates['onnxruntime'] / rates['pytorch']:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    run, image = trained_run()
    results = {}
    for label, max_batch in (("micro-batching", 32), ("no batching", 1)):
        r = load(run, image, args.clients, args.seconds, max_batch)
        results[label] = r
        print(f"{label:>15}: {r['rps']:,.0f} requests/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"{r['errors']} errors, server RSS {r['rss_before']:.0f} -> {r['rss_after']:.0f} MB")  # fmt: skip
    ratio = results["micro-batching"]["rps"] / results["no batching"]["rps"]
    print(f"micro-batching on/off throughput ratio: {ratio:.2f} ({args.clients} clients, {args.seconds:g} s each)")
    onnx_vs_torch(run)


if __name__ == "__main__":
    main()
