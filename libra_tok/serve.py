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

The event loop only moves bytes: everything whose cost grows with a request (JSON parsing,
base64, checking ids, decoding and preprocessing images, PNG and JSON encoding) runs in
`prepare_threads` preparation threads, in steps that each hold the interpreter briefly, so no
request, however large, holds up the answers to the others (/health included). What the server
holds is bounded: bodies by `max_body_mb`, images being prepared by `prepare_threads`, and the
images of all requests between arrival and answer (pixels, features, answers) by `max_queue`.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import io
import json
import logging
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
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
    # Images in the server at once: being prepared, waiting for the model or being answered
    # (so their pixels, features and answers); beyond this requests get 503 (retry later).
    max_queue: int = 1024
    precision: str = "auto"  # model precision, as ImageTokenizer.encode/decode
    # Threads that parse bodies, decode and preprocess images and encode answers: at most this
    # many requests are being prepared at once, which bounds the memory that preparation takes.
    prepare_threads: int = 4

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_pixels", "max_images", "max_queue", "prepare_threads"):
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


# Everything below runs in a preparation thread, except `read_images` and `_read_body`, which
# only receive bytes. A thread does not free the event loop while it sits in one long C call
# (json.loads of 30 MB, one base64 pass over it): the call holds the interpreter throughout.
# So bodies are checked for size and number of values before json.loads sees them, and long
# strings (base64 images) and long answers are handled in pieces of _PIECE bytes.
_PIECE = 1 << 20
_B64_PIECE = 3 << 18  # raw bytes per piece of a base64 answer: a multiple of 3, 1 MiB of base64
_LONG_STRING = 1024  # JSON strings this long (base64 images) are cut out before json.loads
_BYTES_PER_ID = 32  # room per id in a /decode body: digits, separators and indentation
_JSON_SLACK = 16 << 10  # room in a JSON body for other keys and formatting
_MAX_DIGITS = 18  # integers in JSON bodies: anything longer cannot be an id or a flag


def _parse_int(text: str) -> int:
    # A Python hook, called for every integer: json.loads then lets other threads run between
    # numbers, and a 5000-digit number gets a clear answer instead of int()'s ValueError.
    digits = len(text) - text.startswith("-")
    if digits > _MAX_DIGITS:
        raise ServeError(422, f"an integer with {digits} digits is out of range (at most {_MAX_DIGITS} digits)")
    return int(text)


def _refuse_constant(name: str):
    raise ServeError(400, f"request body is not valid JSON ({name} is not a JSON value; use a number)")


def _loads(data: bytes, positions: bool = True):
    """json.loads for a client's body: every failure is a ServeError (400 unparsable, 422 number
    out of range); `positions=False` leaves out where the error is (a body with parts cut out)."""
    try:
        return json.loads(data, parse_int=_parse_int, parse_constant=_refuse_constant)
    except RecursionError:
        raise ServeError(400, "request body is not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as exc:
        raise ServeError(400, f"request body is not valid JSON ({exc if positions else exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ServeError(400, f"request body is not valid JSON ({exc})") from None


def _backslash_run_start(body: bytes, low: int, end: int) -> int:
    """Where the run of backslashes that ends just before body[end] starts (not before `low`);
    in steps of 64 bytes, so a long run costs little."""
    while end > low:
        window = max(low, end - 64)
        kept = len(body[window:end].rstrip(b"\\"))
        if kept:
            return window + kept
        end = window
    return low


def _closing_quote(body: bytes, start: int) -> int:
    """The index of the quote that ends the JSON string whose content starts at body[start]
    (-1 if none): the first quote not escaped, i.e. not after an odd number of backslashes."""
    quote = body.find(b'"', start)
    while quote >= 0 and (quote - _backslash_run_start(body, start, quote)) % 2:
        quote = body.find(b'"', quote + 1)
    return quote


def _cut_long_strings(body: bytes, max_rest: int) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A JSON body without its long strings: every string literal of _LONG_STRING bytes or more is
    replaced by a placeholder that no client can guess, mapped to the (start, end) of the
    string's content in `body`. The rest is parsed by json.loads at once, the long strings piece
    by piece (`_string_pieces`). 413 when the rest would be larger than `max_rest` bytes."""
    if body[:4].count(0) or body[:2] in (b"\xff\xfe", b"\xfe\xff"):  # the scan below reads UTF-8
        raise ServeError(400, "request body is not valid JSON (send it as UTF-8, not UTF-16 or UTF-32)")
    quotes = body.count(b'"')  # bounds the loop below (escaped quotes included)
    if quotes > max_rest:
        raise ServeError(413, f'the JSON body holds {quotes} quotes (limit {max_rest}): too many strings for '
                              '{"images": ["<base64>", ...]}')
    tag = secrets.token_hex(8)
    parts: list[bytes] = []
    spans: dict[str, tuple[int, int]] = {}
    pos = cut = 0  # body[pos:] is not in parts yet; `cut` bytes of strings were left out
    quote = body.find(b'"')
    while quote >= 0:
        close = _closing_quote(body, quote + 1)
        if close < 0:
            break  # unterminated: json.loads says so
        if close - quote - 1 >= _LONG_STRING:
            name = f"{tag}:{len(spans)}"
            placeholder = json.dumps(name).encode()
            parts += [body[pos:quote], placeholder]
            spans[name] = (quote + 1, close)
            cut += close + 1 - quote - len(placeholder)
            pos = close + 1
        quote = body.find(b'"', close + 1)
    if len(body) - cut > max_rest:
        raise _too_much_json(len(body) - cut, max_rest)
    parts.append(body[pos:])
    return b"".join(parts), spans


def _too_much_json(size: int, limit: int) -> ServeError:
    return ServeError(413, f'the JSON body holds {size} bytes besides its base64 images (limit {limit}); send '
                           '{"images": ["<base64>", ...]} and nothing else, or the images as multipart files')


def _safe_cut(body: bytes, pos: int, cut: int) -> int:
    """A position in (pos, cut] that splits no escape sequence of the JSON string text
    body[pos:...] (pos is not inside one): escapes are at most 6 bytes and start with a backslash,
    so only backslashes in the last 6 bytes before `cut` matter; cutting where their run starts
    is safe, as the byte before it ends whatever came before. (A surrogate pair cut in two
    decodes as two lone surrogates, which matters only for non-ASCII text: never base64.)"""
    last = body.rfind(b"\\", max(pos, cut - 6), cut)
    if last < 0:
        return cut
    run = _backslash_run_start(body, pos, last + 1)
    if run > pos:
        return run
    # From pos to `last` nothing but backslashes: they pair up into escaped backslashes.
    return last + 1 if (last + 1 - pos) % 2 == 0 else last


def _string_pieces(body: bytes, start: int, end: int) -> Iterator[bytes]:
    """The content body[start:end] of a JSON string literal, unescaped, in pieces of at most
    _PIECE bytes, as ASCII (anything else becomes '?')."""
    if body.find(b"\\", start, end) < 0:  # nothing escaped: the bytes are the text
        for pos in range(start, end, _PIECE):
            yield body[pos:min(pos + _PIECE, end)]
        return
    pos = start
    while pos < end:
        cut = end if end - pos <= _PIECE else _safe_cut(body, pos, pos + _PIECE)
        yield _loads(b'"' + body[pos:cut] + b'"', positions=False).encode("ascii", "replace")
        pos = cut


def _b64decode(pieces: Iterable[bytes], where: str) -> bytes:
    """Base64 text given in pieces (whitespace ignored: line breaks are common; a data URL prefix
    data:...;base64, dropped) -> the bytes, decoded piece by piece as strictly as
    base64.b64decode(validate=True)."""
    out: list[bytes] = []
    carry = b""  # the last len % 4 characters, decoded with the next piece
    padded = False
    try:
        for n, piece in enumerate(pieces):
            if n == 0 and piece.startswith(b"data:"):  # data URL: data:image/png;base64,....
                piece = piece.partition(b",")[2]
            text = carry + b"".join(piece.split())
            if padded and text:
                raise binascii.Error("Excess data after padding")
            whole = len(text) - len(text) % 4
            out.append(binascii.a2b_base64(text[:whole], strict_mode=True))
            padded = text[:whole].endswith(b"=")
            carry = text[whole:]
        if carry:
            out.append(binascii.a2b_base64(carry, strict_mode=True))  # raises: not a multiple of 4
    except binascii.Error as exc:
        raise ServeError(400, f"{where} is not valid base64 ({exc})") from None
    return b"".join(out)


IMAGE_FORMATS = ('multipart/form-data (one file part per image), application/json '
                 '({"images": ["<base64>", ...]}) or a raw image body (Content-Type image/*)')


def parse_images_json(body: bytes, max_images: int) -> tuple[list[tuple[str, bytes]], bool | None]:
    """A JSON /encode body -> the encoded images as (name, bytes) and its `features` flag (None
    when absent). Runs in a preparation thread."""
    rest, spans = _cut_long_strings(body, max_images * _LONG_STRING + _JSON_SLACK)
    obj = _loads(rest, positions=not spans)
    if not isinstance(obj, dict) or not ({"images", "image"} & obj.keys()):
        raise ServeError(422, 'expected a JSON object {"images": ["<base64 image>", ...]} '
                              '(or {"image": "<base64 image>"})')
    items = obj["images"] if "images" in obj else [obj["image"]]
    if not isinstance(items, list):
        raise ServeError(422, f'"images" must be a list of base64 strings, got {type(items).__name__}')
    if len(items) > max_images:
        raise ServeError(413, f"too many images in one request ({len(items)} > max_images {max_images})")
    images = []
    for i, item in enumerate(items):
        where = f"images[{i}]"
        if not isinstance(item, str):
            raise ServeError(422, f"{where} must be a base64 string, got {type(item).__name__}")
        pieces = _string_pieces(body, *spans[item]) if item in spans else [item.encode("ascii", "replace")]
        images.append((where, _b64decode(pieces, where)))
    features = _flag(obj["features"], "features") if "features" in obj else None
    return images, features


async def _read_body(request: Request, limit: int, what: str, hint: str) -> list[bytes]:
    """The body as received, in chunks (joined later, off the event loop); 413 above `limit`
    bytes, from Content-Length before anything is read, or as soon as more has arrived."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body too large for {what} ({int(declared)} bytes, limit {limit} bytes); {hint}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body too large for {what} (more than {limit} bytes); {hint}")
        chunks.append(chunk)
    return chunks


async def read_images(request: Request, max_images: int, run=run_in_threadpool) -> tuple[list[tuple[str, bytes]], bool]:
    """The encoded images of a request as (name, bytes), and whether features were asked for
    (`?features=true`, or a `features` field of the JSON body or form). `run(fn, *args)` runs the
    parsing of a JSON body (in the server: its preparation threads)."""
    features = _flag(request.query_params.get("features", "false"), "features")
    media = _media_type(request)
    images: list[tuple[str, bytes]] = []
    if media == "multipart/form-data":
        # Parsed as it streams in, a piece at a time; more parts than allowed is a 400.
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
        chunks = [chunk async for chunk in request.stream()]  # RequestGuard bounds the size
        images, flag = await run(lambda: parse_images_json(b"".join(chunks), max_images))
        features = features if flag is None else flag
    elif media.startswith("image/") or media == "application/octet-stream":
        images = [("", await request.body())]
    else:
        raise ServeError(415, f"unsupported Content-Type {media or '(none)'!r}; send {IMAGE_FORMATS}")
    if not images:
        raise ServeError(422, f"the request holds no image; send {IMAGE_FORMATS}")
    if len(images) > max_images:
        raise ServeError(413, f"too many images in one request ({len(images)} > max_images {max_images})")
    return images, features


def decode_body_limit(num_tokens: int, num_codebooks: int, max_images: int) -> int:
    """The largest /decode body accepted: max_images grids, _BYTES_PER_ID bytes per id."""
    return max_images * num_tokens * num_codebooks * _BYTES_PER_ID + _JSON_SLACK


def parse_ids_json(body: bytes, num_tokens: int, num_codebooks: int, codebook_size: int,
                   max_images: int) -> tuple[torch.Tensor, bool]:
    """A JSON /decode body -> (B, N, C) int64 ids and whether a single grid was sent. Runs in a
    preparation thread. Lists and values are counted first: json.loads builds them all in one
    call, and a body of small lists (`[[],[],...]`) costs far more per byte than ids do."""
    lists = body.count(b"[") + body.count(b"{")
    commas = body.count(b",")
    # at most: an object, the list of grids, max_images grids of N lists of C ids (+ slack for other keys)
    most_lists = (2 + max_images * (1 + num_tokens)) * 5 // 4 + 64
    most_commas = max_images * num_tokens * num_codebooks * 5 // 4 + 64
    if lists > most_lists or commas > most_commas:
        raise ServeError(413, f"the JSON body holds more values than {max_images} id grids of ({num_tokens}, "
                              f"{num_codebooks}) can ({lists} lists or objects, {commas} commas); send at most "
                              f"max_images grids per request")
    return parse_ids(_loads(body), num_tokens, num_codebooks, codebook_size, max_images)


_KINDS = {bool: "booleans", float: "floats", str: "strings", type(None): "nulls", dict: "objects"}


def parse_ids(obj, num_tokens: int, num_codebooks: int, codebook_size: int,
              max_images: int) -> tuple[torch.Tensor, bool]:
    """A parsed JSON `{"ids": ...}` body -> (B, N, C) int64 ids and whether a single grid (N, C)
    was sent."""
    shape = f"({num_tokens}, {num_codebooks}) for one image or (B, {num_tokens}, {num_codebooks}) for several"
    if not isinstance(obj, dict) or "ids" not in obj:
        raise ServeError(422, f'expected a JSON object {{"ids": [[id1, id2], ...]}} with ids of shape {shape}')
    # dtype=object: numpy finds the nesting, the values are checked here (numpy would turn
    # [true, 2] into [1, 2] and [1, "2"] into strings)
    try:
        ids = np.asarray(obj["ids"], dtype=object)
    except ValueError as exc:
        raise ServeError(422, f"ids must be a rectangular nested list of shape {shape} ({exc})") from None
    kinds = {type(value) for value in ids.flat}
    if list in kinds:  # lists where numbers should be: rows of different lengths or depths
        raise ServeError(422, f"ids must be a rectangular nested list of shape {shape}")
    if kinds - {int}:
        kind = next((_KINDS[k] for k in _KINDS if k in kinds), "non-integer values")
        raise ServeError(422, f"ids must be integers in [0, {codebook_size}), got {kind}")
    single = ids.ndim == 2
    if single:
        ids = ids[None]
    if ids.ndim != 3 or ids.shape[1:] != (num_tokens, num_codebooks) or len(ids) == 0:
        got = ids.shape[1:] if single else ids.shape
        raise ServeError(422, f"ids must have shape {shape}, got {tuple(got)}")
    if len(ids) > max_images:
        raise ServeError(413, f"too many id grids in one request ({len(ids)} > max_images {max_images})")
    ids = ids.astype(np.int64)  # every value an int of at most _MAX_DIGITS digits
    bad = np.argwhere((ids < 0) | (ids >= codebook_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0][int(single):])
        raise ServeError(422, f"ids must be in [0, {codebook_size}); found {int(ids[tuple(bad[0])])} at index "
                              f"{list(where)} ({len(bad)} out of range)")
    return torch.from_numpy(ids), single


# ---- answers ---------------------------------------------------------------------------------
#
# Built in a preparation thread as a list of parts: bytes, sent as they are, and memoryviews of
# raw bytes, base64-encoded a piece at a time while they are sent. A large answer thus never
# exists twice (raw and base64), nor is it written or encoded in one long step on the event loop.


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless either way; level 1 is much faster
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    """As JSONResponse renders it: compact UTF-8."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def encode_answer(ids: torch.Tensor, sizes: list[list[int]], grid: int,
                  features: torch.Tensor | None) -> list[bytes | memoryview]:
    """The /encode answer: ids as nested lists; features as base64 little-endian float16."""
    body = {"ids": ids.tolist(), "shape": list(ids.shape), "grid": grid, "image_sizes": sizes}
    if features is None:
        return [_json_bytes(body)]
    marker = "@features@"
    body["features"] = {"dtype": "float16", "byteorder": "little", "shape": list(features.shape), "data": marker}
    head, tail = _json_bytes(body).split(_json_bytes(marker))
    raw = np.ascontiguousarray(features.numpy(), dtype="<f2").reshape(-1).view(np.uint8)
    return [head + b'"', memoryview(raw), b'"' + tail]


def decode_answer(images: torch.Tensor) -> list[bytes | memoryview]:
    """The /decode answer for several images: {"images": ["<base64 PNG>", ...], "format": "png"}."""
    parts: list[bytes | memoryview] = [b'{"images":[']
    for i, image in enumerate(images):
        parts += [b',"' if i else b'"', memoryview(_png(to_pil(image))), b'"']
    return parts + [b'],"format":"png"}']


def _answer_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(part) if isinstance(part, bytes) else 4 * -(-len(part) // 3) for part in parts)


def _b64_piece(data: memoryview) -> bytes:
    return binascii.b2a_base64(data, newline=False)


class _StreamedAnswer(StreamingResponse):
    """A StreamingResponse that calls `release` once it is over: sent, failed or abandoned."""

    def __init__(self, content, *, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


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
        """A response of answer parts (see encode_answer); sent in pieces of about 1 MB, the
        base64 of raw parts computed piece by piece in the preparation threads. `release` (of
        the request's admission) is called once the answer is over."""
        if len(parts) == 1 and isinstance(parts[0], bytes) and len(parts[0]) <= _PIECE:
            release()
            return Response(parts[0], media_type=media_type)

        async def pieces():
            for part in parts:
                if isinstance(part, memoryview):
                    for i in range(0, len(part), _B64_PIECE):
                        yield await offload(_b64_piece, part[i:i + _B64_PIECE])
                else:
                    for i in range(0, len(part), _PIECE):
                        yield part[i:i + _PIECE]

        return _StreamedAnswer(pieces(), media_type=media_type, headers={"Content-Length": str(_answer_size(parts))},
                               release=release)

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
            return answer(await offload(encode_answer, ids, sizes, cfg.grid_size, features), "application/json", release)
        except BaseException:
            release()
            raise

    @app.post("/decode")
    async def decode(request: Request):
        """{"ids": (N, C) grid} -> one PNG; {"ids": (B, N, C)} -> {"images": [base64 PNG, ...]}."""
        if _media_type(request) != "application/json":
            raise ServeError(415, f'/decode takes application/json {{"ids": [[id1, id2], ...]}}, got '
                                  f'{_media_type(request) or "(none)"!r}')
        with batcher.expecting():
            chunks = await _read_body(request, decode_limit, "/decode",
                                      f"it takes at most max_images ({config.max_images}) grids of "
                                      f"{cfg.num_tokens}x{cfg.num_codebooks} ids")
            ids, single = await offload(lambda: parse_ids_json(b"".join(chunks), cfg.num_tokens, cfg.num_codebooks,
                                                               cfg.codebook_size, config.max_images))
            release = admission.admit(len(ids))
        try:
            images = await batcher.decode(ids)
            if single:
                parts = [await offload(lambda: _png(to_pil(images[0])))]
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
                return _png(canvas)

            return answer([await offload(side_by_side)], "image/png", release)
        except BaseException:
            release()
            raise

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
           "parse_ids_json", "parse_images_json", "decode_body_limit", "read_images", "preset_name"]
