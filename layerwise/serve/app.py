"""`layerwise serve`: a run as an HTTP service (FastAPI on uvicorn), with micro-batched inference.

Concurrent requests are run through the network together: those that arrive while a batch runs make up
the next one (up to `max_batch`, optionally after waiting `max_wait_ms`), so throughput grows with load.
A classifier decodes uploads in memory; the other tasks read them from a private temporary folder, under
generated names (an upload's own name is only echoed back, never used as a path).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerwise import __version__
from layerwise.data.sources import Example, Problem
from layerwise.errors import InputError


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32  # inputs run through the network together
    # How long the first request of a batch waits for others. 0: a batch is what arrived while the previous
    # one ran, which under load is already full (serve_load at 32 clients: 1,650 requests/s, p99 30 ms, against
    # 1,400 and 40 ms at 2 ms, 1,230 and 40-50 ms at 5 ms: each wait costs a timer and idles the network).
    max_wait_ms: float = 0.0
    max_body_bytes: int = 16 << 20
    max_inputs: int = 64  # files or texts in one request
    timeout_s: float = 30.0  # per request
    api_key: str | None = None
    threads: int = 1  # PyTorch (or ONNX Runtime) threads per server process (see inference_threads)
    onnx_model: str | None = None  # a classifier exported by export_for_serving: run on ONNX Runtime

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_inputs < 1 or self.timeout_s <= 0:
            raise InputError("serve: --max-batch, --max-inputs and --timeout must be positive, --max-wait-ms >= 0")
        if self.threads < 1:
            raise InputError("serve: --threads must be at least 1")


def inference_threads(workers: int) -> int:
    """PyTorch threads per worker: the cores left after each worker's event loop has one.

    The event loop parses HTTP on a core of its own; PyTorch threads beyond the remaining cores spin in
    OpenMP barriers against it, which made a 2-core server 20x slower per batch (benchmarks/serve_load.py).
    """
    return max(1, (os.cpu_count() or 1) // workers - 1)


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class MicroBatcher:
    """Collects inputs from concurrent requests and decodes and predicts them together in one worker thread.

    Decoding happens in the batch thread too, so a request costs the event loop only its HTTP parsing:
    one thread hop per batch instead of two per request (measured in benchmarks/serve_load.py).
    """

    def __init__(self, bundle, network, config: ServeConfig) -> None:
        self.bundle, self.network, self.config = bundle, network, config
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    async def predict(self, examples: list[Example], k: int) -> list:
        """A `Prediction` or a `Problem` per example, in order."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((examples, k, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self.run())
        return await future

    async def run(self) -> None:
        while True:
            first = await self.queue.get()
            items, size = [first], len(first[0])
            deadline = time.perf_counter() + self.config.max_wait_ms / 1000
            while size < self.config.max_batch:
                if self.queue.empty():
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    item = self.queue.get_nowait()
                items.append(item)
                size += len(item[0])
            await asyncio.to_thread(self.run_batch, items)

    def run_batch(self, items: list) -> None:
        task, network = self.bundle.task, self.network
        examples = [example for item_examples, _, _ in items for example in item_examples]
        try:
            # One decode and one forward pass for every waiting request; the task calibrates and adds the OOD flag.
            k = max(item_k for _, item_k, _ in items)
            results = list(task.predict_stream(network, examples, k))
        except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the server goes on
            for *_, future in items:
                future.get_loop().call_soon_threadsafe(_fail, future, err)
            return
        start = 0
        for item_examples, k, future in items:
            part = results[start : start + len(item_examples)]
            start += len(item_examples)
            part = [replace(r, top_k=r.top_k[:k]) if hasattr(r, "top_k") else r for r in part]
            future.get_loop().call_soon_threadsafe(_resolve, future, part)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, err: Exception) -> None:
    if not future.done():
        future.set_exception(err)


def create_app(bundle, config: ServeConfig, run_dir: Path) -> FastAPI:
    torch.set_num_threads(config.threads)
    app = FastAPI(title=f"layerwise: {bundle.config['model']['name']} ({bundle.task.name})", version=__version__)
    network = bundle.network
    if config.onnx_model is not None:
        from layerwise.serve.onnx_network import OnnxClassifier

        network = OnnxClassifier(Path(config.onnx_model), config.threads)
    batcher = MicroBatcher(bundle, network, config)
    uploads = tempfile.TemporaryDirectory(prefix="layerwise-serve-")
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}

    app.add_middleware(Guard, config=config)

    @app.exception_handler(HTTPError)
    async def http_error(_request: Request, err: HTTPError):
        return error(err.status, err.message)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(_request: Request, err: StarletteHTTPException):  # e.g. malformed multipart
        return error(err.status_code, str(err.detail))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict:
        return {
            "task": bundle.task.name,
            "modality": bundle.task.modality,
            "model": bundle.config["model"]["name"],
            "runtime": "onnxruntime" if config.onnx_model else "pytorch",
            "labels": bundle.config.get("class_labels"),
            "metrics": metrics,
            "layerwise_version": __version__,
        }

    @app.post("/predict")
    async def predict(request: Request, k: int = 3):
        if "predict" not in bundle.task.commands:
            raise HTTPError(400, f"this is a {bundle.task.name} run; use /generate")
        examples, names = await read_inputs(request, bundle, config, Path(uploads.name))
        if hasattr(bundle.task, "detect"):  # boxes: one detector call per request (images differ in size)
            return await detect_uploads(examples, names)
        try:
            results = await batcher.predict(examples, k)
        finally:
            for example in examples:
                if example.path is not None:
                    example.path.unlink(missing_ok=True)
        if all(isinstance(result, Problem) for result in results):
            raise HTTPError(422, "; ".join(f"{names.get(r.origin, r.origin)}: {r.reason}" for r in results))
        # A JSONResponse built here skips FastAPI's generic encoder: these are plain dicts already.
        return JSONResponse({"predictions": [
            {"path": names.get(result.origin, result.origin), "error": result.reason}
            if isinstance(result, Problem)
            else result.to_json() | {"path": names.get(result.path, result.path)}  # fold: a FASTA record's name
            for result in results
        ]})  # fmt: skip

    async def detect_uploads(examples: list, names: dict[str, str]) -> dict:
        try:
            detections, problems = await asyncio.to_thread(
                bundle.task.detect, bundle.network, [example.path for example in examples]
            )
        finally:
            for example in examples:
                example.path.unlink(missing_ok=True)
        if not detections:
            raise HTTPError(422, "; ".join(f"{names.get(p.origin, p.origin)}: {p.reason}" for p in problems))
        found = {d.path: d.to_json() for d in detections}
        reasons = {p.origin: p.reason for p in problems}
        results = [
            found[e.origin] | {"path": names[e.origin]}
            if e.origin in found
            else {"path": names[e.origin], "error": reasons.get(e.origin, "not decodable")}
            for e in examples
        ]
        return {"predictions": results}

    @app.post("/generate")
    async def generate(request: Request):
        if "generate" not in bundle.task.commands:
            raise HTTPError(400, f"this is a {bundle.task.name} run; use /predict")
        body = await json_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise HTTPError(400, "'prompt': a non-empty string is required")
        options = {
            "max_new_tokens": int(body.get("max_new_tokens", 100)), "temperature": float(body.get("temperature", 0.8)),
            "top_k": body.get("top_k"), "top_p": body.get("top_p"), "seed": body.get("seed"),
        }  # fmt: skip
        if options["max_new_tokens"] > 2048:
            raise HTTPError(400, "'max_new_tokens' may be at most 2048")
        if body.get("stream"):
            return StreamingResponse(stream_tokens(bundle, prompt, options), media_type="text/event-stream")
        try:
            result = await asyncio.to_thread(bundle.generate, prompt, **options)
        except InputError as err:
            raise HTTPError(400, str(err)) from None
        return result.to_json()

    # What start-up loaded (torch, the network, the run) lives as long as the server: moved out of the garbage
    # collector's reach, with younger generations collected less often, full collections stop pausing
    # requests (serve_load p99 at 32 clients: 40-210 ms before, 41-54 ms after, on the same noisy 2 cores).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    return app


SETTINGS_ENV = "LAYERWISE_SERVE"  # how `--workers N` hands the run and settings to each worker process


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (`layerwise serve --workers N`), from SETTINGS_ENV."""
    from layerwise.bundle import load

    settings = json.loads(os.environ[SETTINGS_ENV])
    run = Path(settings.pop("run"))
    return create_app(load(run), ServeConfig(**settings), run)


class Guard:
    """API key, body-size limit and per-request timeout, as plain ASGI middleware.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps every request in extra tasks and
    streams, which cost more than the network's forward pass for small images.
    """

    def __init__(self, app, config: ServeConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self.refusal(scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        try:
            await asyncio.wait_for(self.app(scope, receive, send), self.config.timeout_s)
        except TimeoutError:
            await error(504, f"the request took longer than {self.config.timeout_s:g} s")(scope, receive, send)

    def refusal(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        config = self.config
        if path != "/health" and config.api_key is not None:
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return error(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return error(413, f"request body of {int(length):,} bytes exceeds the limit of {config.max_body_bytes:,}")
        return None


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def json_body(request: Request) -> dict:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise HTTPError(415, "send application/json")
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPError(400, f"malformed JSON ({err})") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the JSON body must be an object")
    return body


async def read_inputs(request: Request, bundle, config: ServeConfig, folder: Path) -> tuple[list[Example], dict]:
    """Examples from a multipart upload (files) or JSON {"texts": [...]}; origin -> the name shown back."""
    content_type = request.headers.get("content-type", "")
    examples, names = [], {}
    if content_type.startswith("application/json"):
        texts = (await json_body(request)).get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise HTTPError(400, "'texts': a non-empty list of non-empty strings is required")
        if bundle.task.modality != "text":
            raise HTTPError(400, f"this run classifies {bundle.task.modality}, not text: upload files")
        if len(texts) > config.max_inputs:
            raise HTTPError(400, f"{len(texts)} texts; at most {config.max_inputs} per request")
        for i, text in enumerate(texts):
            examples.append(Example(origin=f"text {i}", label=None, text=text))
            names[f"text {i}"] = f"text {i}"
        return examples, names
    if not content_type.startswith("multipart/form-data"):
        raise HTTPError(415, 'send multipart/form-data files (or application/json {"texts": [...]} for text)')
    form = await request.form(max_files=config.max_inputs + 1)
    files = [value for _, value in form.multi_items() if hasattr(value, "read")]
    if not files:
        raise HTTPError(400, "no files in the upload")
    if len(files) > config.max_inputs:
        raise HTTPError(400, f"{len(files)} files; at most {config.max_inputs} per request")
    in_memory = getattr(bundle.task, "decodes_bytes", False)
    for upload in files:
        data = await upload.read()
        if in_memory:  # a name unique across the requests that share a batch: problems are matched by it
            origin = f"upload {uuid.uuid4().hex}"
            examples.append(Example(origin=origin, label=None, data=data))
            names[origin] = upload.filename or "upload"
            continue
        suffix = Path(upload.filename or "").suffix.lower()[:8]
        handle = tempfile.NamedTemporaryFile(dir=folder, suffix=suffix if suffix.isascii() else "", delete=False)
        with handle:
            handle.write(data)
        path = Path(handle.name)
        examples.append(Example(origin=str(path), label=None, path=path))
        names[str(path)] = upload.filename or "upload"
    return examples, names


async def stream_tokens(bundle, prompt: str, options: dict):
    """Server-sent events: one `data:` line per piece of text, then `event: done` with the summary."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def produce() -> None:
        try:
            emit = lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)  # noqa: E731
            result = bundle.generate(prompt, on_text=emit, **options)
            loop.call_soon_threadsafe(queue.put_nowait, result)
        except InputError as err:
            loop.call_soon_threadsafe(queue.put_nowait, err)

    asyncio.get_running_loop().run_in_executor(None, produce)
    while True:
        item = await queue.get()
        if isinstance(item, str):
            yield f"data: {json.dumps(item)}\n\n"
        elif isinstance(item, InputError):
            yield f"event: error\ndata: {json.dumps(str(item))}\n\n"
            return
        else:
            yield f"event: done\ndata: {json.dumps(item.to_json())}\n\n"
            return
