"""How much load does `layerwise serve` take, and what does micro-batching buy?

Trains (once, cached under .cache/bench) a convnet_s on 3 Fashion-MNIST classes, starts `layerwise
serve` as a separate process on 127.0.0.1, and drives it with `wrk` (a C load generator, Debian's
`wrk`, installed by scripts/setup.sh): N concurrent connections, each posting one 28x28 PNG as
multipart/form-data and waiting for the answer, for a bounded time. Python client threads were used
before; on 2 cores they spent more CPU than the server and measured themselves. Reports requests/s,
p50/p99 latency, errors (must be 0), and the server's RSS (all its processes) after a warm-up load
and after the measured load (no growth). Then the same with micro-batching off (--max-batch 1), and
prints the ratio. Finally ONNX Runtime vs PyTorch inference throughput on the same network (batch 1
and 32). Only loopback traffic; every loop is bounded in time.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from layerwise.data.datasets import prepare_fashion_mnist
from layerwise.demo import default_cache

BENCH_DIR = Path(".cache/bench")
BOUNDARY = "layerwise-bench-boundary"
# wrk's Lua hooks: post the prepared body; at the end print one JSON line with the counts and percentiles.
WRK_SCRIPT = """
local f = io.open(os.getenv("BODY_FILE"), "rb")
wrk.body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=BOUNDARY"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "seconds": %f, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
""".replace("BOUNDARY", BOUNDARY)


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
    """The resident memory of a process and its children (uvicorn's workers), in MB."""
    total = 0.0
    for proc in [pid, *children(pid)]:
        try:
            lines = Path(f"/proc/{proc}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:"))
    return total


def children(pid: int) -> list[int]:
    try:
        direct = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return direct + [g for c in direct for g in children(c)]


def multipart_body(image: Path) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{image.name}"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    return head.encode() + image.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def wrk(url: str, folder: Path, clients: int, seconds: float) -> dict:
    result = subprocess.run(
        ["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{round(seconds)}s", "--timeout", "10s",
         "-s", str(folder / "post.lua"), f"{url}/predict"],
        capture_output=True, text=True, timeout=seconds + 60, env={"BODY_FILE": str(folder / "body.bin")},
    )  # fmt: skip
    line = next((line for line in result.stdout.splitlines() if line.startswith("{")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {result.stdout}{result.stderr}")
    return json.loads(line)


def load(run: Path, image: Path, clients: int, seconds: float, max_batch: int, workers: int) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "layerwise", "serve", str(run), "--port", str(port), "--max-batch", str(max_batch),
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "body.bin").write_bytes(multipart_body(image))
            (folder / "post.lua").write_text(WRK_SCRIPT)
            wrk(url, folder, clients, 3)  # warm-up: every worker has loaded, allocated and batched
            rss_before = rss_mb(server.pid)
            measured = wrk(url, folder, clients, seconds)
        return {
            "rps": measured["requests"] / measured["seconds"],
            "p50_ms": measured["p50_us"] / 1000,
            "p99_ms": measured["p99_us"] / 1000,
            "errors": measured["errors"],
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
    parser.add_argument("--workers", type=int, default=2, help="server processes (one per core on 2 cores)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("serve_load needs wrk (Debian package `wrk`; scripts/setup.sh installs it)")
    run, image = trained_run()
    print(f"{args.clients} connections for {args.seconds:g} s, `layerwise serve --workers {args.workers}`, "
          f"{torch.get_num_threads()} cores")  # fmt: skip
    results = {}
    for label, max_batch in (("micro-batching", 32), ("no batching", 1)):
        r = load(run, image, args.clients, args.seconds, max_batch, args.workers)
        results[label] = r
        print(f"{label:>15}: {r['rps']:,.0f} requests/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"{r['errors']} errors, server RSS {r['rss_before']:.0f} -> {r['rss_after']:.0f} MB")  # fmt: skip
    ratio = results["micro-batching"]["rps"] / results["no batching"]["rps"]
    print(f"micro-batching on/off throughput ratio: {ratio:.2f}")
    onnx_vs_torch(run)


if __name__ == "__main__":
    main()
