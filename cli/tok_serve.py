"""`libra-tok serve`: the tokenizer as an HTTP service (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import FiniteFloat, fail_on_errors
from .hub import MODEL_HELP, ModelRef, offline_option

# Defaults of libra_tok.serve.ServeConfig (kept here so --help does not import torch; a test
# checks that they agree).
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_MAX_PIXELS = 1 << 26
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_QUEUE = 1024
DEFAULT_PREPARE_THREADS = 4


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=ModelRef(), default=None,
              help="Tokenizer to serve: a folder written by save_pretrained (config.json + model.safetensors), "
                   f"an official Libra vqgan.ckpt or its folder; {MODEL_HELP}.")
@click.option("--preset", default=None,
              help="Serve a freshly initialised tokenizer of this preset instead of --checkpoint (random "
                   "quantizer and decoder, so ids and images mean nothing: for trying the service and for "
                   "tests; 'tiny' needs no downloads).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default accepts local connections only; 0.0.0.0 (or ::) "
                   "opens the service to the network, which has no authentication: put it behind a proxy "
                   "or firewall.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port; 0 picks a free one (the address is printed at start).")
@click.option("--device", default="auto", show_default=True,
              help="Torch device of the model: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="CLIP precision: auto = bf16 autocast on CUDA, fp32 elsewhere; the quantizer always runs "
                   "in fp32. bf16 can flip ids whose pre-sign value is near zero.")
@click.option("--max-batch", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH, show_default=True,
              help="Most images in one forward pass: concurrent requests are merged up to this. Larger is "
                   "faster per image on a GPU and needs more memory.")
@click.option("--max-wait-ms", type=FiniteFloat(min=0), default=DEFAULT_MAX_WAIT_MS, show_default=True,
              help="Longest time the oldest queued request waits for requests still being received or "
                   "preprocessed, to share its forward pass: latency traded for throughput. Nobody waits "
                   "when no other request is on its way; 0: run whatever is queued at once.")
@click.option("--max-body-mb", type=FiniteFloat(min=0, min_open=True), default=DEFAULT_MAX_BODY_MB,
              show_default=True, help="Refuse request bodies larger than this many MiB (413).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse uploaded images with more pixels (width x height) than this, read from the "
                   "header before decoding: protects against decompression bombs (413).")
@click.option("--max-images", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGES, show_default=True,
              help="Most images (or id grids) in one request (413 beyond).")
@click.option("--max-queue", type=click.IntRange(min=1), default=DEFAULT_MAX_QUEUE, show_default=True,
              help="Most images in the server at once, from the moment their request has been read until "
                   "its answer has been sent (preprocessing, waiting for the model, answering); further "
                   "requests get 503 (retry later) instead of piling up in memory.")
@click.option("--prepare-threads", type=click.IntRange(min=1), default=DEFAULT_PREPARE_THREADS, show_default=True,
              help="Threads that parse request bodies, decode and preprocess images and encode answers, "
                   "off the event loop: at most this many requests are prepared at once, each holding one "
                   "decoded image (up to --max-pixels) at a time, which bounds the memory preparation takes. "
                   "More threads keep a fast GPU busier.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow Python objects besides tensors when loading an official .ckpt (unpickling can "
                   "run code: only for files you trust).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, help="Server log level; debug also logs every request.")
@offline_option
@fail_on_errors
def serve_command(checkpoint: Path | None, preset: str | None, host: str, port: int, device: str, precision: str,
                  max_batch: int, max_wait_ms: float, max_body_mb: float, max_pixels: int, max_images: int,
                  max_queue: int, prepare_threads: int, trust_pickle: bool, log_level: str) -> None:
    """Serve a tokenizer over HTTP: POST /encode, /decode, /reconstruct; GET /health, /info.

    \b
    /encode       images (multipart files, JSON {"images": [base64, ...]} or a raw
                  image body) -> {"ids": [[[id1, id2], ...]], ...}; ?features=true
                  adds the CLIP features as base64 float16
    /decode       JSON {"ids": grid (N, 2)} -> PNG; {"ids": (B, N, 2)} -> base64 PNGs
    /reconstruct  one image -> PNG of input | reconstruction
    \b
    Concurrent requests share forward passes (--max-batch, --max-wait-ms). Python
    client: libra_tok.client.TokenizerClient(url). Stop with Ctrl+C.
    """
    if (checkpoint is None) == (preset is None):
        raise click.UsageError("give exactly one of --checkpoint PATH (a trained tokenizer) or --preset NAME "
                               "(random weights, e.g. --preset tiny)")
    try:
        from libra_tok.serve import ServeConfig, serve
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    import torch

    from libra_tok import ImageTokenizer
    from libra_tok.precision import resolve_device

    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_mb=max_body_mb, max_pixels=max_pixels,
                         max_images=max_images, max_queue=max_queue, precision=precision,
                         prepare_threads=prepare_threads)
    device = resolve_device(device)
    if checkpoint is not None:
        tok = ImageTokenizer.from_pretrained(checkpoint, trust_pickle=trust_pickle)
        source = str(checkpoint)
    else:
        torch.manual_seed(0)  # the same random tokenizer on every start
        tok = ImageTokenizer(preset)
        source = f"preset {preset} (random weights)"
        click.echo(f"warning: --preset {preset} serves random weights; ids and images carry no meaning", err=True)
    tok = tok.to(device).eval()
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}: anyone who can reach this address can use the service "
                   "(no authentication)", err=True)

    def started(url: str) -> None:
        cfg = tok.config
        click.echo(f"serving {source} on {url} ({cfg.grid_size}x{cfg.grid_size} grid x {cfg.num_codebooks} ids, "
                   f"{cfg.resolution} px, {device}, max batch {max_batch}, max wait {max_wait_ms:g} ms); "
                   "Ctrl+C stops")

    try:
        serve(tok, config, host, port, log_level=log_level, source=source, on_started=started)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled after a clean shutdown
        pass


if __name__ == "__main__":
    serve_command()
