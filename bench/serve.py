"""Throughput and latency of `libra-tok serve` beside in-process encoding (the ceiling).

    python bench/serve.py                                   # tiny preset, CPU: runs anywhere
    python bench/serve.py --checkpoint path/to/tokenizer --device cuda --clients 1,8,32,64

The server runs in its own process (as in production: the clients' Python does not share its
interpreter); each client is a thread sending one image per POST /encode and waiting for the
answer, so N clients keep at most N requests in flight. The in-process rows run
`ImageTokenizer.encode` on batches of --max-batch images in this process while the server
idles: "model" on preprocessed pixels, "decode+preprocess+model" from the same encoded file
the clients send, which is the work the server does per request minus HTTP. The last column
is each row's images/s over the model-only rate (the ceiling); img/pass is the mean number of
images per forward pass the server ran (its /health counters), i.e. how much batching happened;
health max is the slowest of the GET /health requests a separate thread sends every 20 ms
while the clients run (the server keeps parsing and preprocessing off its event loop, so this
stays in milliseconds under any load).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libra_tok import ImageTokenizer  # noqa: E402
from libra_tok.client import TokenizerClient  # noqa: E402
from libra_tok.data import decode_image_bytes  # noqa: E402


def start_server(args) -> tuple[subprocess.Popen, str]:
    source = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--preset", args.preset]
    cmd = [sys.executable, "-m", "libra_cli.tok_serve", *source, "--port", "0", "--device", args.device,
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the server uses --threads too
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r" on (http://\S+) ", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r} (run the command by hand: {' '.join(cmd)})")
    return proc, match.group(1)


def in_process(tok: ImageTokenizer, data: bytes, batch: int, seconds: float) -> tuple[float, float]:
    """Images/s of encode alone and of decode + preprocess + encode, batches of `batch`."""
    pixels = tok.preprocess([decode_image_bytes(data)] * batch)
    tok.encode(pixels)  # warm-up

    def rate(step) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            done += batch
        if tok.device.type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)

    model = rate(lambda: tok.encode(pixels).ids.cpu())
    full = rate(lambda: tok.encode(tok.preprocess([decode_image_bytes(data) for _ in range(batch)])).ids.cpu())
    return model, full


def load(url: str, data: bytes, clients: int, requests: int) -> tuple[float, np.ndarray, dict, float]:
    """`clients` threads share `requests` requests: (requests/s, latencies in ms, stats delta,
    the slowest /health answer meanwhile in ms)."""
    stats_client = TokenizerClient(url)
    before = stats_client.health()["stats"]
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def run(n: int) -> None:
        client = TokenizerClient(url)
        barrier.wait()
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                client.encode(data)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(exc)
            latencies.append((time.perf_counter() - t0) * 1000)

    health: list[float] = []
    finished = threading.Event()

    def probe() -> None:
        client = TokenizerClient(url)
        while not finished.wait(0.02):
            t0 = time.perf_counter()
            client.health()
            health.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=run, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    prober = threading.Thread(target=probe)
    barrier.wait()
    start = time.perf_counter()
    prober.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    finished.set()
    prober.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {requests} requests failed, first: {errors[0]}")
    after = stats_client.health()["stats"]
    delta = {k: after[k] - before[k] for k in ("encode_passes", "images_encoded")}
    return requests / elapsed, np.asarray(latencies), delta, max(health, default=float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tokenizer preset with random weights (default: tiny)")
    p.add_argument("--checkpoint", type=Path, default=None, help="serve this tokenizer instead of --preset")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=256, help="requests per row (split among the clients)")
    p.add_argument("--image", type=Path, default=ROOT / "assets" / "chelsea.png", help="the image every request sends")
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch and in-process batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each in-process measurement")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads here and in the server (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    data = args.image.read_bytes()
    tok = ImageTokenizer.from_pretrained(args.checkpoint) if args.checkpoint else ImageTokenizer(args.preset)
    tok = tok.to(device).eval()
    width, height = decode_image_bytes(data).size
    print(f"libra-tok serve benchmark: {args.checkpoint or 'preset ' + args.preset}, {device}, "
          f"torch threads {torch.get_num_threads()}, max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, "
          f"{args.image.name} ({width}x{height}, {len(data) / 1024:.0f} kB) per request, {args.requests} requests "
          "per row (one image each: img/s = requests/s)")

    ceiling, full_rate = in_process(tok, data, args.max_batch, args.seconds)
    del tok
    rows = [("in-process encode (model only)", "-", ceiling, None, None, None, None),
            ("in-process decode+preprocess+encode", "-", full_rate, None, None, None, None)]
    proc, url = start_server(args)
    try:
        client = TokenizerClient(url)
        for _ in range(8):  # warm-up: first passes, connections, allocator
            client.encode(data)
        for n in (int(c) for c in args.clients.split(",")):
            rate, lat, delta, health = load(url, data, n, args.requests)
            per_pass = delta["images_encoded"] / max(delta["encode_passes"], 1)
            rows.append(("HTTP POST /encode", str(n), rate, float(np.percentile(lat, 50)),
                         float(np.percentile(lat, 99)), per_pass, health))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    header = (f"{'mode':<38}{'clients':>8}{'img/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'img/pass':>10}{'/ceiling':>10}"
              f"{'health max ms':>15}")
    print(header)
    print("-" * len(header))
    for name, clients, rate, p50, p99, per_pass, health in rows:
        cells = [f"{name:<38}{clients:>8}{rate:>10.1f}"]
        cells.append(f"{p50:>9.1f}{p99:>9.1f}{per_pass:>10.1f}" if p50 is not None else f"{'':>9}{'':>9}{'':>10}")
        cells.append(f"{rate / ceiling:>10.2f}")
        cells.append(f"{health:>15.1f}" if health is not None else "")
        print("".join(cells))


if __name__ == "__main__":
    main()
