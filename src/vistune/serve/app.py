"""The HTTP API of `vistune serve` (FastAPI on uvicorn): many tasks on one frozen backbone.

    GET    /healthz                    liveness + what is loaded
    GET    /metrics                    Prometheus text: requests, images, batch sizes, queue depth, latencies
    GET    /v1/tasks                   the tasks: name, method, classes, tuned parameters, preprocessing
    POST   /v1/tasks                   hot-load an artifact {"path": DIR, "name": optional} (under --adapter-root)
    DELETE /v1/tasks/{task}            unload a task
    POST   /v1/tasks/{task}/predict    images of one task: multipart files, or JSON {"image"|"images": base64}
    POST   /v1/predict                 images of several tasks: JSON {"inputs": [{"task", "image"}]}, or multipart
                                       whose file fields are named by their task

Every error is JSON ``{"error": {"what": ..., "fix": ...}}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..artifacts import read_meta
from ..data.images import decode_image_bytes
from ..errors import VistuneError
from ..multitask import MultiTask, TaskInfo
from ..run import transforms_for
from .batcher import DynamicBatcher, TaskGone
from .metrics import ServerMetrics

MiB = 1 << 20
logger = logging.getLogger("uvicorn.error")  # the server's own log, at uvicorn's level


@dataclass
class ServeConfig:
    """The server's limits and batching (the `vistune serve` options)."""

    max_batch: int = 32  # images per model pass
    max_wait_ms: float = 5.0  # how long a batch waits for more images after its first
    max_queue: int = 256  # images admitted and not yet answered; beyond: 503
    max_images: int = 64  # images per request
    max_body_bytes: int = 32 * MiB  # request body
    top_k: int = 5  # classes per image unless the request asks otherwise
    adapter_roots: list[str] = field(default_factory=list)  # where POST /v1/tasks may load from (none: off)
    retry_after_s: int = 1  # the Retry-After of a 503


class ApiError(Exception):
    def __init__(self, status: int, what: str, fix: str | None = None, headers: dict | None = None):
        super().__init__(what)
        self.status, self.what, self.fix, self.headers = status, what, fix, headers or {}


def _error(status: int, what: str, fix: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"what": what, "fix": fix}}, status_code=status, headers=headers)


class _Tasks:
    """Per task what the server needs besides the model: its eval transform (the artifact's own preprocessing)."""

    def __init__(self):
        self.transforms: dict[str, object] = {}

    def add(self, info: TaskInfo) -> None:
        prep = info.meta["preprocessing"]
        missing = [k for k in ("image_size", "data_config", "normalization", "augment") if k not in prep]
        if missing:
            raise VistuneError(f"task {info.name!r} ({info.path}): adapter.json's preprocessing lacks {missing}",
                               "serve artifacts written by `vistune train` (they record their preprocessing)")
        self.transforms[info.name] = transforms_for(prep)[1]


def describe(info: TaskInfo) -> dict:
    meta = info.meta
    prep = meta["preprocessing"]
    return {"name": info.name, "method": meta["method"], "classes": meta["class_names"],
            "num_classes": meta["num_classes"], "parameters": meta.get("parameters", {}),
            "image_size": prep.get("image_size"), "backbone": meta["backbone"]["name"], "path": info.path,
            "runs": info.run, "prompt_tokens": info.prompt_tokens}


def _inside(path: Path, roots: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots)


def create_app(model: MultiTask, config: ServeConfig) -> FastAPI:
    """The ASGI app serving ``model``'s tasks (its batcher starts and drains with the app's lifespan)."""
    metrics = ServerMetrics()
    batcher = DynamicBatcher(model, metrics, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000,
                             max_queue=config.max_queue)
    tasks = _Tasks()
    for info in model.tasks.values():
        tasks.add(info)
    metrics.tasks.set(len(model.tasks))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has let the in-flight requests finish; answer what is still queued
        logger.warning("vistune serve: stopped; answered every request in flight")

    app = FastAPI(title="vistune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model, app.state.batcher, app.state.metrics = model, batcher, metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics.requests.labels(name, str(response.status_code)).inc()
        if name.endswith("/predict") and response.status_code == 200:
            metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status, e.what, e.fix, e.headers)

    @app.exception_handler(VistuneError)
    async def vistune_error(request, e: VistuneError):
        return _error(422, e.what, e.fix)

    # ---- reading a request ------------------------------------------------------------------
    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body is {int(declared):,} bytes, over the limit of "
                                f"{config.max_body_bytes:,}", "send fewer or smaller images per request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {config.max_body_bytes:,} bytes",
                               "send fewer or smaller images per request")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parts_of(request: Request) -> tuple[list[tuple[str | None, bytes]], dict]:
        """(field name or task, image bytes) pairs and the other fields of a JSON or multipart body."""
        body = await body_of(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the body is not valid JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ApiError(400, "the JSON body must be an object")
            return _json_images(doc), doc
        if kind == "multipart/form-data":
            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=config.max_images + 1,
                                                                 max_fields=config.max_images + 16)
            except Exception as e:  # starlette: MultiPartException / HTTPException for a malformed body
                raise ApiError(400, f"cannot parse the multipart body ({getattr(e, 'detail', e)})") from None
            images, fields = [], {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    images.append((key, await value.read()))
                else:
                    fields[key] = value
            return images, fields
        raise ApiError(415, f"unsupported content type {kind or '(none)'!r}",
                       "send multipart/form-data (image files) or application/json (base64 images)")

    def top_k_of(request: Request, fields: dict) -> int:
        raw = request.query_params.get("top_k", fields.get("top_k", config.top_k))
        try:
            k = int(raw)
        except (TypeError, ValueError):
            raise ApiError(400, f"top_k={raw!r} is not a whole number") from None
        if k < 1:
            raise ApiError(400, f"top_k={k} must be at least 1")
        return k

    def check_task(name: str) -> None:
        if name not in model.tasks:
            raise ApiError(404, f"unknown task {name!r}",
                           f"loaded tasks: {', '.join(model.tasks) or '(none)'} (GET /v1/tasks)")

    def decode(data: bytes, task: str, where: str):
        try:
            image = decode_image_bytes(data, where)
        except VistuneError as e:
            raise ApiError(413 if "too large to decode" in e.what else 400, e.what, e.fix) from None
        return tasks.transforms[task](image)

    async def predict(request: Request, pairs: list[tuple[str, bytes]], top_k: int) -> list[dict]:
        """(task, image bytes) pairs → one prediction per image, in order."""
        if not pairs:
            raise ApiError(400, "the request holds no image",
                           "multipart: attach image files; JSON: give base64 images (see GET /v1/tasks)")
        if len(pairs) > config.max_images:
            raise ApiError(413, f"{len(pairs)} images in one request, over the limit of {config.max_images}",
                           f"send at most {config.max_images} images per request")
        for task, _ in pairs:
            check_task(task)
        if not batcher.admit(len(pairs)):
            raise ApiError(503, f"the server is at capacity ({batcher.pending} images queued, limit "
                                f"{config.max_queue})", f"retry after {config.retry_after_s} s",
                           {"Retry-After": str(config.retry_after_s)})
        try:
            images = []
            for i, (task, data) in enumerate(pairs):
                images.append(await run_in_threadpool(decode, data, task, f"#{i} of the request"))
        except BaseException:
            batcher.release(len(pairs))
            raise
        try:
            results = await batcher.predict(images, [t for t, _ in pairs])
        except TaskGone as e:
            raise ApiError(404, f"task {e.args[0]!r} was unloaded while the request waited") from None
        out = []
        for (task, _), result in zip(pairs, results):
            names = model.tasks[task].meta["class_names"] if task in model.tasks else []
            top = result.probabilities.topk(min(top_k, len(result.probabilities)))
            out.append({"task": task, "top_k": [{"class": names[i], "probability": float(p)}
                                                for p, i in zip(top.values.tolist(), top.indices.tolist())]})
        return out

    # ---- routes -----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "tasks": len(model.tasks), "queue_depth": batcher.pending}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/tasks")
    async def list_tasks():
        return {"backbone": model.backbone.spec.name, "tasks": [describe(t) for t in model.tasks.values()]}

    @app.post("/v1/tasks/{task}/predict")
    async def predict_one(task: str, request: Request):
        check_task(task)
        images, fields = await parts_of(request)
        preds = await predict(request, [(task, data) for _, data in images], top_k_of(request, fields))
        return {"task": task, "predictions": [{"top_k": p["top_k"]} for p in preds]}

    @app.post("/v1/predict")
    async def predict_many(request: Request):
        images, fields = await parts_of(request)
        if any(name is None for name, _ in images):
            raise ApiError(400, "every input must name its task", 'JSON: {"inputs": [{"task": T, "image": B64}]}')
        return {"predictions": await predict(request, images, top_k_of(request, fields))}

    @app.post("/v1/tasks", status_code=201)
    async def load_task(request: Request):
        if not config.adapter_roots:
            raise ApiError(403, "hot loading is off", "start `vistune serve` with --adapter-root DIR")
        _, doc = await parts_of(request)
        path = doc.get("path")
        if not isinstance(path, str) or not path:
            raise ApiError(400, 'the body must be JSON {"path": ARTIFACT_DIR, "name": optional}')
        if not _inside(Path(path), config.adapter_roots):
            raise ApiError(403, f"{path} is not under an --adapter-root ({', '.join(config.adapter_roots)})",
                           "put the artifact under one of those folders")
        name = doc.get("name") or Path(os.path.realpath(path)).name
        if not isinstance(name, str):
            raise ApiError(400, "name must be a string")
        if name in model.tasks:
            raise ApiError(409, f"a task named {name!r} is already loaded",
                           f"DELETE /v1/tasks/{name} first, or give another name")
        try:
            read_meta(path)  # a clear 4xx for a folder that is no artifact, before the model thread is busy
            info = await batcher.call(model.add, path, name)
        except VistuneError as e:
            raise ApiError(422, e.what, e.fix) from None
        try:
            tasks.add(info)
        except VistuneError as e:
            await batcher.call(model.remove, name)
            raise ApiError(422, e.what, e.fix) from None
        metrics.tasks.set(len(model.tasks))
        return {"task": describe(info)}

    @app.delete("/v1/tasks/{task}")
    async def unload_task(task: str):
        check_task(task)
        await batcher.call(model.remove, task)
        tasks.transforms.pop(task, None)
        metrics.tasks.set(len(model.tasks))
        return {"removed": task}

    return app


def _json_images(doc: dict) -> list[tuple[str | None, bytes]]:
    """The base64 images of a JSON body: {"image": B64}, {"images": [B64, …]} or {"inputs": [{"task", "image"}]}."""
    if "inputs" in doc:
        inputs = doc["inputs"]
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            raise ApiError(400, '"inputs" must be a list of {"task": T, "image": B64} objects')
        return [(i.get("task") if isinstance(i.get("task"), str) else None, _b64(i.get("image"), n))
                for n, i in enumerate(inputs)]
    if "images" in doc:
        if not isinstance(doc["images"], list):
            raise ApiError(400, '"images" must be a list of base64 strings')
        return [(None, _b64(v, n)) for n, v in enumerate(doc["images"])]
    if "image" in doc:
        return [(None, _b64(doc["image"], 0))]
    return []


def _b64(value, n: int) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, f"image #{n} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image #{n} is not valid base64") from None
