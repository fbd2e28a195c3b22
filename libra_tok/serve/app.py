"""The service's application: `create_app` builds the FastAPI app of a tokenizer, with its
endpoints (/encode, /decode, /reconstruct, /health, /info), the admission of images
(max_queue) and the preparation threads that do everything whose cost grows with a request."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from ..config import PRESETS
from ..data import ImageReadError, decode_image_bytes
from ..model import ImageTokenizer
from ..preprocess import preprocess_image, to_pil
from ..version import __version__
from .answers import decode_answer, encode_answer, png_bytes, stream_answer
from .batching import Batcher
from .config import ServeConfig, ServeError
from .requests import RequestGuard, content_type, decode_body_limit, json_error, parse_ids_json, read_body, read_images

log = logging.getLogger(__name__)


class _Admission:
    """Counts the images of the requests admitted and not answered yet; refuses (503) a request
    that would take the count above `limit`. Used on the event loop only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def admit(self, count: int) -> Callable[[], None]:
        """Admit `count` images; the returned release may be called any number of times."""
        if self.held + count > self.limit:
            raise ServeError(503, f"server busy: {self.held} images are being processed (max_queue {self.limit}); "
                                  "retry later")
        self.held += count
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held -= count

        return release


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
    decode_limit = decode_body_limit(cfg.num_tokens, cfg.num_codebooks, config.max_images)
    pool: ThreadPoolExecutor | None = None  # the preparation threads, while the server runs
    admission = _Admission(config.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        nonlocal pool
        pool = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="libra-tok-prepare")
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    async def offload(fn: Callable, *args):
        """fn(*args) in a preparation thread. Running out of memory there fails this request
        alone, with a 503, and frees what it held."""
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
        except MemoryError:
            log.warning("out of memory while preparing a request")
            raise ServeError(503, "the server ran out of memory while preparing this request; retry later, "
                                  "or send fewer or smaller images") from None

    def answer(parts: list[bytes | memoryview], media_type: str, release: Callable[[], None]) -> Response:
        return stream_answer(parts, media_type, release, offload)

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
        return json_error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404, 405, unparsable multipart
        counts["rejected" if exc.status_code < 500 else "failed"] += 1
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = (f"{message}: {request.method} {request.url.path}; the endpoints are "
                       "POST /encode, POST /decode, POST /reconstruct, GET /health, GET /info")
        return json_error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        counts["failed"] += 1
        return json_error(500, f"internal error: {type(exc).__name__}: {exc}")

    def stats() -> dict:
        passes = batcher.stats["encode_passes"] + batcher.stats["decode_passes"]
        return {**counts, **batcher.stats, "forward_passes": passes, "queued_images": batcher.queued,
                "incoming_requests": batcher.incoming, "held_images": admission.held}

    def prepare(images: list[tuple[str, bytes]]) -> tuple[torch.Tensor, list[list[int]]]:
        """Decode and preprocess (in a preparation thread), one image at a time: pixels
        (k, 3, R, R) and original sizes."""
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
            "serve": {**asdict(config), "max_body_bytes": config.max_body_bytes,
                      "max_decode_body_bytes": decode_limit},
            "stats": stats(),
        }

    @app.post("/encode")
    async def encode(request: Request):
        """Images -> ids (B, N, C) as nested lists; with features=true also the CLIP features
        as base64 little-endian float16 of the given shape."""
        with batcher.expecting():
            images, want_features = await read_images(request, config.max_images, offload)
            release = admission.admit(len(images))
        try:
            with batcher.expecting():
                pixels, sizes = await offload(prepare, images)
            ids, features = await batcher.encode(pixels, want_features)
            parts = await offload(encode_answer, ids, sizes, cfg.grid_size, features)
            return answer(parts, "application/json", release)
        except BaseException:
            release()
            raise

    @app.post("/decode")
    async def decode(request: Request):
        """{"ids": (N, C) grid} -> one PNG; {"ids": (B, N, C)} -> {"images": [base64 PNG, ...]}."""
        if content_type(request) != "application/json":
            raise ServeError(415, f'/decode takes application/json {{"ids": [[id1, id2], ...]}}, got '
                                  f'{content_type(request) or "(none)"!r}')
        with batcher.expecting():
            chunks = await read_body(request, decode_limit, "/decode",
                                      f"it takes at most max_images ({config.max_images}) grids of "
                                      f"{cfg.num_tokens}x{cfg.num_codebooks} ids")
            ids, single = await offload(lambda: parse_ids_json(b"".join(chunks), cfg.num_tokens, cfg.num_codebooks,
                                                               cfg.codebook_size, config.max_images))
            release = admission.admit(len(ids))
        try:
            images = await batcher.decode(ids)
            if single:
                parts = [await offload(lambda: png_bytes(to_pil(images[0])))]
                return answer(parts, "image/png", release)
            return answer(await offload(decode_answer, images), "application/json", release)
        except BaseException:
            release()
            raise

    @app.post("/reconstruct")
    async def reconstruct(request: Request):
        """One image -> PNG of the model's input view (left) and its reconstruction (right)."""
        with batcher.expecting():
            images, _ = await read_images(request, config.max_images, offload)
            if len(images) != 1:
                raise ServeError(422, f"/reconstruct takes exactly one image, got {len(images)}")
            release = admission.admit(1)
        try:
            with batcher.expecting():
                pixels, _ = await offload(prepare, images)
            ids, _ = await batcher.encode(pixels)
            decoded = await batcher.decode(ids)

            def side_by_side() -> bytes:
                left, right = to_pil(tokenizer.target(pixels)[0]), to_pil(decoded[0])
                canvas = Image.new("RGB", (left.width + right.width, left.height))
                canvas.paste(left, (0, 0))
                canvas.paste(right, (left.width, 0))
                return png_bytes(canvas)

            return answer([await offload(side_by_side)], "image/png", release)
        except BaseException:
            release()
            raise

    return app


__all__ = ["create_app", "preset_name"]
