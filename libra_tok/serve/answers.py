"""The answers of the service, built in a preparation thread as a list of parts and sent in
pieces.

Parts are bytes, sent as they are, and memoryviews of raw bytes, base64-encoded a piece at a
time while they are sent. A large answer thus never exists twice (raw and base64), nor is it
written or encoded in one long step on the event loop.
"""

from __future__ import annotations

import binascii
import io
import json
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from fastapi.responses import Response, StreamingResponse
from PIL import Image

from ..preprocess import to_pil

_PIECE = 1 << 20  # bytes of an answer sent at once
_B64_PIECE = 3 << 18  # raw bytes per piece of a base64 answer: a multiple of 3, 1 MiB of base64


def png_bytes(image: Image.Image) -> bytes:
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
        parts += [b',"' if i else b'"', memoryview(png_bytes(to_pil(image))), b'"']
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


def stream_answer(parts: list[bytes | memoryview], media_type: str, release: Callable[[], None],
                  offload: Callable[..., Awaitable]) -> Response:
    """A response of answer parts (see encode_answer); sent in pieces of about 1 MB, the
    base64 of raw parts computed piece by piece by `offload(fn, *args)` (the server's
    preparation threads). `release` (of the request's admission) is called once the answer is
    over: sent, failed or abandoned."""
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



__all__ = ["encode_answer", "decode_answer", "stream_answer", "png_bytes"]
