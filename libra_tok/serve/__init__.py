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

One module per part: `config` (ServeConfig, ServeError), `batching` (Batcher), `requests`
(body limits and parsing), `answers` (responses built and sent in pieces), `app` (create_app
and its endpoints), `server` (bind, serve, ServerThread).
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # the optional `serve` extra
    raise ImportError("libra_tok.serve needs FastAPI, uvicorn and python-multipart: "
                      f"pip install 'libra[serve]' ({exc})") from exc

from .app import create_app, preset_name
from .batching import Batcher
from .config import ServeConfig, ServeError
from .requests import decode_body_limit, parse_ids, parse_ids_json, parse_images_json, read_images
from .server import ServerThread, bind, serve

__all__ = ["ServeConfig", "ServeError", "Batcher", "create_app", "serve", "ServerThread", "bind", "parse_ids",
           "parse_ids_json", "parse_images_json", "decode_body_limit", "read_images", "preset_name"]
