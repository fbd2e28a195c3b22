"""Reading and parsing requests within limits: the body-size guard (RequestGuard), bodies read
in chunks, JSON / base64 / multipart images, and id grids for /decode.

Everything here runs in a preparation thread, except `read_images`, `read_body` and
RequestGuard, which only receive bytes on the event loop. A thread does not free the event loop
while it sits in one long C call (json.loads of 30 MB, one base64 pass over it): the call holds
the interpreter throughout. So bodies are checked for size and number of values before
json.loads sees them, and long strings (base64 images) are decoded in pieces of _PIECE bytes.
"""

from __future__ import annotations

import binascii
import json
import secrets
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .config import ServeError


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
            return await json_error(err.status, err.message)(scope, receive, send)
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


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise ServeError(422, f"{name} must be true or false, got {value!r}")


_PIECE = 1 << 20  # a long JSON string is unescaped and decoded in pieces of this many bytes
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


async def read_body(request: Request, limit: int, what: str, hint: str) -> list[bytes]:
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
    media = content_type(request)
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


__all__ = ["RequestGuard", "IMAGE_FORMATS", "json_error", "read_body", "read_images",
           "parse_images_json", "decode_body_limit", "parse_ids_json", "parse_ids"]
