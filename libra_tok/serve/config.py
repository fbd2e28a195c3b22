"""What a tokenizer service is configured with (ServeConfig) and how it refuses a request
(ServeError: an HTTP status and a message for the client)."""

from __future__ import annotations

from dataclasses import dataclass

from ..precision import PRECISIONS


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

