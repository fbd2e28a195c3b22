"""The service's lifecycle: bind a socket, serve until interrupted (`serve`, the CLI), or run in
a background thread of this process (`ServerThread`, for tests, notebooks and benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from ..model import ImageTokenizer
from .app import create_app
from .batching import Batcher
from .config import ServeConfig


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



__all__ = ["bind", "url_of", "serve", "ServerThread"]
