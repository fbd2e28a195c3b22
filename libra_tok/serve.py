"""The tokenizer as an HTTP service: encode, decode and reconstruct over loopback or a network.

    libra-tok serve --checkpoint path/to/tokenizer             # http://127.0.0.1:8000
    curl -F images=@cat.jpg http://127.0.0.1:8000/encode       # {"ids": [[[id1, id2], ...]], ...}

    from libra_tok.serve import ServerThread                    # in a notebook or a test
    with ServerThread(ImageTokenizer.from_pretrained(path)) as server:
        TokenizerClient(server.url).encode(["cat.jpg"])

Concurrent clients share forward passes: requests only decode and preprocess their images
(in a thread pool) and queue them; one worker task owns the model and runs a pass as soon as
`max_batch` images wait, no other request is on its way, or the oldest has waited
`max_wait_ms`. Every bad request is answered with a 4xx and a JSON `{"error": "..."}` that says
what was wrong; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
except ImportError as exc:  # the optional `serve` extra
    raise ImportError("libra_tok.serve needs FastAPI, uvicorn and python-multipart: "
                      f"pip install 'libra[serve]' ({exc})") from exc

from . import __version__
from .config import PRESETS
from .data import ImageReadError, decode_image_bytes
from .model import PRECISIONS, ImageTokenizer
from .preprocess import preprocess_image, to_pil

log = logging.getLogger("libra_tok.serve")


@dataclass
class ServeConfig:
    max_batch: int = 16  # images per forward pass; concurrent requests are merged up to this
    max_wait_ms: float = 5.0  # longest wait of the oldest queued image for requests on their way
    max_body_mb: float = 32.0  # request bodies above this are refused (413)
    max_pixels: int = 1 << 26  # width x height above this is refused before decoding (decompression bombs)
    max_images: int = 64  # images (or id grids) in one request
    max_queue: int = 1024  # images waiting for the model; beyond this requests get 503 (retry later)
    precision: str = "auto"  # model precision, as ImageTokenizer.encode/decode

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_pixels", "max_images", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not self.max_body_mb > 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ServeError(Exception):
    """A request the server refuses: HTTP `status` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---- dynamic batching ------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "encode" (inputs: pixels (k, 3, R, R)) or "decode" (inputs: ids (k, N, C))
    inputs: torch.Tensor
    features: bool  # encode: return the CLIP features too
    future: asyncio.Future
    enqueued: float  # event-loop time

    @property
    def size(self) -> int:
        return len(self.inputs)


class Batcher:
    """One asyncio task owns the model: it gathers queued jobs into batches of at most
    `max_batch` images and runs each pass in a dedicated thread, so the event loop keeps
    accepting requests while the model works. Jobs larger than `max_batch` run in chunks.

    The worker waits for company (up to `max_wait_ms` after the oldest job queued) only while
    requests are on their way (`expecting()`: reading, decoding, preprocessing): a lone
    client pays no waiting time, concurrent clients share passes."""

    def __init__(self, tokenizer: ImageTokenizer, config: ServeConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.max_wait = config.max_wait_ms / 1000.0
        self.stats = {"encode_passes": 0, "decode_passes": 0, "images_encoded": 0, "images_decoded": 0,
                      "largest_batch": 0}
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in self._jobs
        self._running: list[_Job] = []  # taken, waiting for their pass
        self._incoming = 0  # requests being read and prepared, about to submit
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def incoming(self) -> int:
        return self._incoming

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Mark a request that will submit a job soon (while it reads and prepares its inputs)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._wake is not None:
                self._wake.set()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="libra-tok-model")
        self._task = asyncio.create_task(self._run(), name="libra-tok-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in [*self._running, *self._jobs]:
            if not job.future.done():
                job.future.set_exception(ServeError(503, "the server is shutting down"))
        self._jobs.clear()
        self._queued = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def encode(self, pixels: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k, 3, R, R) pixels -> ids (k, N, C) int64 and, if asked, features (k, N, D) float16."""
        return await self._submit("encode", pixels, features)

    async def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(k, N, C) ids -> images (k, 3, R, R) in [-1, 1], on the CPU."""
        return await self._submit("decode", ids, False)

    async def _submit(self, kind: str, inputs: torch.Tensor, features: bool):
        if not self.alive:
            raise ServeError(503, "the model worker is not running (the server is starting or shutting down)")
        if self._queued + len(inputs) > self.config.max_queue:
            raise ServeError(503, f"server busy: {self._queued} images are queued (max_queue "
                                  f"{self.config.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        job = _Job(kind, inputs, features, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._queued += job.size
        self._wake.set()
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            # Wait for company while some is on its way: until a full batch queues, no request
            # is being prepared any more, or the oldest job has waited max_wait.
            deadline = self._jobs[0].enqueued + self.max_wait
            while self._queued < self.config.max_batch and self._incoming > 0:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            self._running = self._take()
            try:
                for kind in ("encode", "decode"):
                    group = [job for job in self._running if job.kind == kind]
                    if group:
                        await self._execute(kind, group)
            except Exception as exc:  # noqa: BLE001 - fail this batch, keep the worker alive
                log.exception("batch failed")
                for job in self._running:
                    if not job.future.done():
                        job.future.set_exception(ServeError(500, f"internal error: {type(exc).__name__}: {exc}"))
            self._running = []

    def _take(self) -> list[_Job]:
        """Oldest jobs first, up to max_batch images (a larger first job is taken alone);
        jobs whose client went away are dropped."""
        taken: list[_Job] = []
        images = 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # cancelled: the client disconnected
                self._jobs.popleft()
                self._queued -= job.size
                continue
            if taken and images + job.size > self.config.max_batch:
                break
            self._jobs.popleft()
            self._queued -= job.size
            taken.append(job)
            images += job.size
        return taken

    async def _execute(self, kind: str, group: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        features = any(job.features for job in group)
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward, kind,
                                                 [job.inputs for job in group], features)
        except Exception as exc:  # noqa: BLE001 - a failed pass fails its requests, never the worker
            if len(group) > 1:  # e.g. out of memory: one at a time may still succeed
                for job in group:
                    await self._execute(kind, [job])
                return
            log.exception("%s pass failed", kind)
            if not group[0].future.done():
                group[0].future.set_exception(ServeError(500, f"{kind} failed: {type(exc).__name__}: {exc}"))
            return
        start = 0
        for job in group:
            part = [None if out is None else out[start:start + job.size] for out in outputs]
            start += job.size
            if job.future.done():
                continue
            if kind == "encode":
                job.future.set_result((part[0], part[1] if job.features else None))
            else:
                job.future.set_result(part[0])

    def _forward(self, kind: str, parts: list[torch.Tensor], features: bool) -> tuple[torch.Tensor | None, ...]:
        """Runs in the model thread: chunks of max_batch, results back on the CPU."""
        tok, precision = self.tokenizer, self.config.precision
        inputs = torch.cat(parts)
        ids, feats, images = [], [], []
        for chunk in inputs.split(self.config.max_batch):
            if kind == "encode":
                out = tok.encode(chunk, precision=precision)
                ids.append(out.ids.cpu())
                if features:
                    feats.append(out.features.half().cpu())
            else:
                images.append(tok.decode(chunk, precision=precision).cpu())
            self.stats[f"{kind}_passes"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(chunk))
        if kind == "encode":
            self.stats["images_encoded"] += len(inputs)
            return torch.cat(ids), (torch.cat(feats) if features else None)
        self.stats["images_decoded"] += len(inputs)
        return (torch.cat(images),)


# ---- request parsing -------------------------------------------------------------------------


class RequestGuard:
    """Counts requests and refuses bodies above `max_bytes` (413): at once from Content-Length,
    or while a chunked body streams in, before it is all held in memory. Pure ASGI, so it
    costs nothing per request."""

    def __init__(self, app, max_bytes: int, counts: dict):
        self.app = app
        self.max_bytes = max_bytes
        self.counts = counts

    def _error(self, received: str) -> ServeError:
        limit_mb = self.max_bytes / (1024 * 1024)
        return ServeError(413, f"request body too large ({received}, limit {self.max_bytes} bytes = "
                               f"{limit_mb:g} MB); send fewer or smaller images, or raise the server's --max-body-mb")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.counts["requests"] += 1
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.counts["rejected"] += 1
            err = self._error(f"{int(declared)} bytes")
            return await _json_error(err.status, err.message)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(f"more than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise ServeError(422, f"{name} must be true or false, got {value!r}")


def _b64decode(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise ServeError(422, f"{where} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):  # data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks are common
    except (binascii.Error, ValueError) as exc:
        raise ServeError(400, f"{where} is not valid base64 ({exc})") from None


async def _read_json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServeError(400, f"request body is not valid JSON ({exc})") from None


IMAGE_FORMATS = ('multipart/form-data (one file part per image), application/json '
                 '({"images": ["<base64>", ...]}) or a raw image body (Content-Type image/*)')


async def read_images(request: Request, max_images: int) -> tuple[list[tuple[str, bytes]], bool]:
    """The encoded images of a request as (name, bytes), and whether features were asked for
    (`?features=true`, or a `features` field of the JSON body or form)."""
    features = _flag(request.query_params.get("features", "false"), "features")
    media = _media_type(request)
    images: list[tuple[str, bytes]] = []
    if media == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=16)
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    images.append((value.filename or key, await value.read()))
                elif key == "features":
                    features = _flag(value, "features")
        finally:
            await form.close()
    elif media == "application/json":
        obj = await _read_json(request)
        if not isinstance(obj, dict) or not ({"images", "image"} & obj.keys()):
            raise ServeError(422, 'expected a JSON object {"images": ["<base64 image>", ...]} '
                                  '(or {"image": "<base64 image>"})')
        items = obj["images"] if "images" in obj else [obj["image"]]
        if not isinstance(items, list):
            raise ServeError(422, f'"images" must be a list of base64 strings, got {type(items).__name__}')
        if len(items) > max_images:
            raise ServeError(413, f"too many images in one request ({len(items)} > max_images {max_images})")
        images = [(f"images[{i}]", _b64decode(item, f"images[{i}]")) for i, item in enumerate(items)]
        features = _flag(obj.get("features", features), "features")
    elif media.startswith("image/") or media == "application/octet-stream":
        images = [("", await request.body())]
    else:
        raise ServeError(415, f"unsupported Content-Type {media or '(none)'!r}; send {IMAGE_FORMATS}")
    if not images:
        raise ServeError(422, f"the request holds no image; send {IMAGE_FORMATS}")
    if len(images) > max_images:
        raise ServeError(413, f"too many images in one request ({len(images)} > max_images {max_images})")
    return images, features


def parse_ids(obj, num_tokens: int, num_codebooks: int, codebook_size: int,
              max_images: int) -> tuple[torch.Tensor, bool]:
    """A JSON `{"ids": ...}` body -> (B, N, C) int64 ids and whether a single grid (N, C) was sent."""
    shape = f"({num_tokens}, {num_codebooks}) for one image or (B, {num_tokens}, {num_codebooks}) for several"
    if not isinstance(obj, dict) or "ids" not in obj:
        raise ServeError(422, f'expected a JSON object {{"ids": [[id1, id2], ...]}} with ids of shape {shape}')
    try:
        ids = np.asarray(obj["ids"])
    except (ValueError, OverflowError) as exc:
        raise ServeError(422, f"ids must be a rectangular nested list of shape {shape} ({exc})") from None
    if ids.size and ids.dtype.kind not in "iu":
        kind = {"f": "floats", "b": "booleans", "U": "strings"}.get(ids.dtype.kind, "non-integer values")
        raise ServeError(422, f"ids must be integers in [0, {codebook_size}), got {kind}")
    single = ids.ndim == 2
    if single:
        ids = ids[None]
    if ids.ndim != 3 or ids.shape[1:] != (num_tokens, num_codebooks) or len(ids) == 0:
        raise ServeError(422, f"ids must have shape {shape}, got {tuple(np.shape(obj['ids']))}")
    if len(ids) > max_images:
        raise ServeError(413, f"too many id grids in one request ({len(ids)} > max_images {max_images})")
    bad = np.argwhere((ids < 0) | (ids >= codebook_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0][int(single):])
        raise ServeError(422, f"ids must be in [0, {codebook_size}); found {int(ids[tuple(bad[0])])} at index "
                              f"{list(where)} ({len(bad)} out of range)")
    return torch.from_numpy(ids.astype(np.int64)), single


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless either way; level 1 is much faster
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---- the application -------------------------------------------------------------------------


def preset_name(tokenizer: ImageTokenizer) -> str | None:
    """The preset whose architecture the tokenizer has (None for a custom config)."""
    arch = tokenizer.config.architecture_hash()
    return next((name for name, cfg in PRESETS.items() if cfg.architecture_hash() == arch), None)


def create_app(tokenizer: ImageTokenizer, config: ServeConfig | None = None, *, source: str | None = None) -> FastAPI:
    """The FastAPI application serving `tokenizer` (put in eval mode). `source` names where the
    weights came from, for /info."""
    config = config or ServeConfig()
    tokenizer.eval()
    cfg = tokenizer.config
    preset = preset_name(tokenizer)
    batcher = Batcher(tokenizer, config)
    started = time.monotonic()
    counts = {"requests": 0, "rejected": 0, "failed": 0}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    # No generated /docs: the endpoints parse their bodies themselves (multipart, JSON or raw),
    # which OpenAPI would describe wrongly; the README documents the API.
    app = FastAPI(title="libra-tok", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.config = config
    app.add_middleware(RequestGuard, max_bytes=config.max_body_bytes, counts=counts)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        counts["rejected" if exc.status < 500 else "failed"] += 1
        return _json_error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404, 405, unparsable multipart
        counts["rejected" if exc.status_code < 500 else "failed"] += 1
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = (f"{message}: {request.method} {request.url.path}; the endpoints are "
                       "POST /encode, POST /decode, POST /reconstruct, GET /health, GET /info")
        return _json_error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        counts["failed"] += 1
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")

    def stats() -> dict:
        passes = batcher.stats["encode_passes"] + batcher.stats["decode_passes"]
        return {**counts, **batcher.stats, "forward_passes": passes, "queued_images": batcher.queued,
                "incoming_requests": batcher.incoming}

    def prepare(images: list[tuple[str, bytes]]) -> tuple[torch.Tensor, list[list[int]]]:
        """Decode and preprocess (in the thread pool): pixels (k, 3, R, R) and original sizes."""
        pixels, sizes = [], []
        for i, (name, data) in enumerate(images):
            label = f"image {i}" + (f" ({name})" if name and not name.startswith("images[") else "")
            try:
                image = decode_image_bytes(data, config.max_pixels)
            except ImageReadError as err:
                status = 413 if str(err).startswith("too many pixels") else 400
                raise ServeError(status, f"{label}: {err}") from None
            sizes.append(list(image.size))
            pixels.append(preprocess_image(image, cfg.resolution, cfg.pad_mode, cfg.image_mean, cfg.image_std))
        return torch.stack(pixels), sizes

    @app.get("/health")
    async def health():
        """Liveness and the counters (forward passes vs images show the batching)."""
        ok = batcher.alive
        body = {"status": "ok" if ok else "error", "uptime_s": round(time.monotonic() - started, 3),
                "stats": stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/info")
    async def info():
        """What is served: preset, config, grid, codebooks, device, limits, version."""
        return {
            "version": __version__,
            "preset": preset,
            "source": source,
            "config": cfg.to_dict(),
            "resolution": cfg.resolution,
            "grid": cfg.grid_size,
            "num_tokens": cfg.num_tokens,
            "num_codebooks": cfg.num_codebooks,
            "codebook_size": cfg.codebook_size,
            "feature_dim": cfg.feature_dim,
            "device": str(tokenizer.device),
            "serve": {**asdict(config), "max_body_bytes": config.max_body_bytes},
            "stats": stats(),
        }

    @app.post("/encode")
    async def encode(request: Request):
        """Images -> ids (B, N, C) as nested lists; with features=true also the CLIP features
        as base64 little-endian float16 of the given shape."""
        with batcher.expecting():
            images, want_features = await read_images(request, config.max_images)
            pixels, sizes = await run_in_threadpool(prepare, images)
        ids, features = await batcher.encode(pixels, want_features)
        body = {"ids": ids.tolist(), "shape": list(ids.shape), "grid": cfg.grid_size, "image_sizes": sizes}
        if features is not None:
            data = await run_in_threadpool(lambda: _b64(features.numpy().astype("<f2").tobytes()))
            body["features"] = {"dtype": "float16", "byteorder": "little", "shape": list(features.shape), "data": data}
        return JSONResponse(body)

    @app.post("/decode")
    async def decode(request: Request):
        """{"ids": (N, C) grid} -> one PNG; {"ids": (B, N, C)} -> {"images": [base64 PNG, ...]}."""
        if _media_type(request) != "application/json":
            raise ServeError(415, f'/decode takes application/json {{"ids": [[id1, id2], ...]}}, got '
                                  f'{_media_type(request) or "(none)"!r}')
        with batcher.expecting():
            ids, single = parse_ids(await _read_json(request), cfg.num_tokens, cfg.num_codebooks,
                                    cfg.codebook_size, config.max_images)
        images = await batcher.decode(ids)
        pngs = await run_in_threadpool(lambda: [_png(to_pil(image)) for image in images])
        if single:
            return Response(pngs[0], media_type="image/png")
        return JSONResponse({"images": [_b64(png) for png in pngs], "format": "png"})

    @app.post("/reconstruct")
    async def reconstruct(request: Request):
        """One image -> PNG of the model's input view (left) and its reconstruction (right)."""
        with batcher.expecting():
            images, _ = await read_images(request, config.max_images)
            if len(images) != 1:
                raise ServeError(422, f"/reconstruct takes exactly one image, got {len(images)}")
            pixels, _ = await run_in_threadpool(prepare, images)
        ids, _ = await batcher.encode(pixels)
        decoded = await batcher.decode(ids)

        def side_by_side() -> bytes:
            left, right = to_pil(tokenizer.target(pixels)[0]), to_pil(decoded[0])
            canvas = Image.new("RGB", (left.width + right.width, left.height))
            canvas.paste(left, (0, 0))
            canvas.paste(right, (left.width, 0))
            return _png(canvas)

        return Response(await run_in_threadpool(side_by_side), media_type="image/png")

    return app


# ---- running it ------------------------------------------------------------------------------


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on host:port (port 0: a free port, read it from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        hint = "choose another port (0 picks a free one)" if port else "check the host address"
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from exc


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, calling `on_started` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def _uvicorn_config(app: FastAPI, log_level: str) -> uvicorn.Config:
    # Access logs only when debugging: a line per request costs throughput under load.
    return uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", lifespan="on",
                          timeout_graceful_shutdown=10)


def serve(tokenizer: ImageTokenizer, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          *, log_level: str = "info", source: str | None = None,
          on_started: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (Ctrl+C or SIGTERM); `on_started(url)` is called once the
    server accepts connections."""
    app = create_app(tokenizer, config, source=source)
    sock = bind(host, port)
    url = url_of(sock)
    server = _Server(_uvicorn_config(app, log_level), (lambda: on_started(url)) if on_started else None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """The service in a background thread of this process, on a free loopback port by default:
    for tests, notebooks and benchmarks. Use as a context manager, or start()/stop()."""

    def __init__(self, tokenizer: ImageTokenizer, config: ServeConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0, *, log_level: str = "warning", source: str | None = None):
        self.app = create_app(tokenizer, config, source=source)
        self.host, self.port = host, port
        self._server = _Server(_uvicorn_config(self.app, log_level))
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self._sock = bind(self.host, self.port)
        self.url = url_of(self._sock)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="libra-tok-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server at {self.url} did not start within {timeout:g} s (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def stats(self) -> dict:
        batcher: Batcher = self.app.state.batcher
        return {**batcher.stats, "forward_passes": batcher.stats["encode_passes"] + batcher.stats["decode_passes"]}

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ServeConfig", "ServeError", "Batcher", "create_app", "serve", "ServerThread", "bind", "parse_ids",
           "read_images", "preset_name"]
