"""A small client for `libra-tok serve`, on the standard library (plus numpy and PIL).

    from libra_tok.client import TokenizerClient
    client = TokenizerClient("http://127.0.0.1:8000")
    out = client.encode(["cat.jpg", "dog.png"])          # out.ids: (2, N, 2) int64 numpy array
    image = client.decode(out.ids[0])                     # PIL image
    pair = client.reconstruct("cat.jpg")                  # PIL image: input | reconstruction

A client object may be shared by threads: every call opens its own connection.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

ImageLike = Union[str, Path, bytes, Image.Image]


class ServerError(RuntimeError):
    """The server answered with an error: `status` (HTTP) and its `message`."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url} answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Encoded:
    ids: np.ndarray  # (B, N, C) int64, row-major grid, column 0 = id1
    features: np.ndarray | None  # (B, N, D) float16 CLIP features, when asked for
    image_sizes: list[tuple[int, int]]  # (width, height) of each input as decoded by the server


def _image_bytes(image: ImageLike) -> tuple[str, bytes]:
    """(name, encoded bytes): files are sent as they are, PIL images as lossless PNG."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "image.png", buf.getvalue()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        return path.name, path.read_bytes()
    raise TypeError(f"expected an image path, encoded image bytes or a PIL image, got {type(image).__name__}")


def _multipart(files: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        safe = "".join(c for c in name if c not in '"\r\n\\') or "image"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{safe}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n")
        parts += [head.encode("utf-8"), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _open_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


class TokenizerClient:
    """Calls a `libra-tok serve` server at `url` (http or https; a path prefix is kept)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 300.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected a server URL like http://127.0.0.1:8000, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._parts = parts
        self._prefix = parts.path.rstrip("/")

    # ---- transport ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, str, bytes]:
        """One HTTP request: (status, content type, body). Errors become ServerError."""
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        headers = {"Content-Type": content_type} if content_type else {}
        send_error: OSError | None = None
        try:
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError) as exc:
                send_error = exc  # the server may have refused the body early (too large): read its answer
            response = conn.getresponse()
            status, ctype, data = response.status, response.getheader("Content-Type", ""), response.read()
        except ConnectionRefusedError as exc:
            raise ConnectionError(f"cannot reach the libra-tok server at {self.url} ({exc.strerror}); "
                                  "is `libra-tok serve` running there?") from exc
        except (http.client.HTTPException, OSError) as exc:
            if send_error is None:
                raise
            raise ConnectionError(f"{self.url} closed the connection while receiving the request "
                                  f"({send_error}); the body may exceed the server's --max-body-mb") from exc
        finally:
            conn.close()
        if status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data[:500].decode("utf-8", errors="replace")
            raise ServerError(status, message, self.url + path)
        return status, ctype, data

    def _json(self, method: str, path: str, obj: Any = None) -> Any:
        body = None if obj is None else json.dumps(obj).encode()
        _, _, data = self.request(method, path, body, "application/json" if body is not None else None)
        return json.loads(data)

    # ---- the API -----------------------------------------------------------------------------
    def health(self) -> dict:
        """{"status": "ok", "uptime_s", "stats": {forward passes, images, requests, ...}}."""
        return self._json("GET", "/health")

    def info(self) -> dict:
        """Preset, config, grid, codebooks, resolution, device, limits and version of the server."""
        return self._json("GET", "/info")

    def encode(self, images: ImageLike | Sequence[ImageLike], features: bool = False) -> Encoded:
        """Images (paths, encoded bytes or PIL images) -> ids (B, N, C) int64 and, with
        `features=True`, the CLIP features (B, N, D) float16."""
        if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
            images = [images]
        body, ctype = _multipart([_image_bytes(image) for image in images])
        _, _, data = self.request("POST", "/encode" + ("?features=true" if features else ""), body, ctype)
        out = json.loads(data)
        ids = np.asarray(out["ids"], dtype=np.int64).reshape(out["shape"])
        feats = None
        if "features" in out:
            f = out["features"]
            feats = np.frombuffer(base64.b64decode(f["data"]), dtype="<f2").reshape(f["shape"])
        return Encoded(ids=ids, features=feats, image_sizes=[tuple(s) for s in out["image_sizes"]])

    def decode(self, ids) -> Image.Image | list[Image.Image]:
        """ids (N, C) -> one PIL image; (B, N, C) -> a list of B images. Numpy arrays, nested
        lists and torch tensors are accepted."""
        if hasattr(ids, "detach"):  # torch tensor, on any device
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        _, ctype, data = self.request("POST", "/decode", json.dumps({"ids": ids.tolist()}).encode(), "application/json")
        if ctype.startswith("image/"):
            return _open_png(data)
        return [_open_png(base64.b64decode(png)) for png in json.loads(data)["images"]]

    def reconstruct(self, image: ImageLike) -> Image.Image:
        """One image -> a PIL image of the model's input view (left) and its reconstruction (right)."""
        body, ctype = _multipart([_image_bytes(image)])
        _, _, data = self.request("POST", "/reconstruct", body, ctype)
        return _open_png(data)


__all__ = ["TokenizerClient", "ServerError", "Encoded"]
