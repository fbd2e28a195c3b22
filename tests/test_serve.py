"""libra-tok serve: the HTTP service, its dynamic batching, its limits and the Python client.

The server runs in a background thread on a free loopback port, with a tiny tokenizer saved
and reloaded from disk; the test's own copy of the tokenizer is the reference.
"""

import asyncio
import base64
import http.client
import io
import json
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import libra_tok
from cli.tok_serve import serve_command
from libra_tok import ImageTokenizer
from libra_tok.client import ServerError, TokenizerClient
from libra_tok.preprocess import load_image, to_pil
from libra_tok.serve import Batcher, ServeConfig, ServerThread, bind

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ServeConfig(max_batch=8, max_wait_ms=20, max_body_mb=4, max_pixels=2_500_000, max_images=12)


@pytest.fixture(scope="module")
def saved_tok(tiny_tok, tmp_path_factory):
    return tiny_tok.save_pretrained(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def server(saved_tok):
    with ServerThread(ImageTokenizer.from_pretrained(saved_tok), CONFIG, source=str(saved_tok)) as running:
        yield running


@pytest.fixture
def client(server):
    return TokenizerClient(server.url, timeout=60)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def raw_post(url: str, path: str, body, content_type: str, chunked: bool = False):
    """POST without the client's conveniences: (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = {"Content-Type": content_type}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        try:
            conn.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading the whole body
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def pixels_equal_within(a: Image.Image, b: Image.Image, tol: int) -> bool:
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    return x.shape == y.shape and int(np.abs(x - y).max()) <= tol


# ---- results equal the in-process tokenizer ---------------------------------------------------


def test_encode_returns_the_ids_of_in_process_encode(client, tiny_tok, asset_images):
    out = client.encode(asset_images)  # 10 files, multipart, run as passes of 8 + 2
    ref = tiny_tok.encode(tiny_tok.preprocess(asset_images))
    assert out.ids.shape == (10, 64, 2) and out.ids.dtype == np.int64
    assert np.array_equal(out.ids, ref.ids.numpy())
    assert out.features is None
    assert out.image_sizes == [Image.open(p).size for p in asset_images]


def test_encode_json_base64_raw_body_and_features(server, client, tiny_tok, asset_images):
    paths = asset_images[:2]
    ref = tiny_tok.encode(tiny_tok.preprocess(paths))
    b64 = [base64.encodebytes(p.read_bytes()).decode() for p in paths]  # with line breaks
    b64[1] = "data:image/png;base64," + b64[1]
    status, body = raw_post(server.url, "/encode", json.dumps({"images": b64, "features": True}), "application/json")
    assert status == 200 and body["shape"] == [2, 64, 2] and body["grid"] == 8
    assert np.array_equal(np.asarray(body["ids"]), ref.ids.numpy())
    f = body["features"]
    assert f["dtype"] == "float16" and f["shape"] == [2, 64, 192]
    features = np.frombuffer(base64.b64decode(f["data"]), dtype="<f2").reshape(f["shape"])
    np.testing.assert_allclose(features.astype(np.float32), ref.features.half().float().numpy(), rtol=2e-3, atol=2e-3)

    features_by_client = client.encode(paths, features=True).features
    assert features_by_client.dtype == np.float16 and np.array_equal(features_by_client, features)

    status, body = raw_post(server.url, "/encode", paths[0].read_bytes(), "image/png")
    assert status == 200 and np.array_equal(np.asarray(body["ids"]), ref.ids[:1].numpy())


def test_decode_matches_in_process_decode(client, tiny_tok, tiny_pixels):
    ids = tiny_tok.encode(tiny_pixels[:3]).ids
    ref = [to_pil(image) for image in tiny_tok.decode(ids)]
    one = client.decode(ids[0].numpy())  # one grid -> one PNG
    assert one.size == (112, 112) and pixels_equal_within(one, ref[0], 1)
    several = client.decode(ids)  # (B, N, 2) tensor -> base64 PNGs
    assert len(several) == 3 and all(pixels_equal_within(a, b, 1) for a, b in zip(several, ref, strict=True))


def test_reconstruct_is_input_beside_its_reconstruction(client, tiny_tok, asset_images):
    path = asset_images[3]
    pair = client.reconstruct(path)
    assert pair.size == (224, 112)
    pixels = tiny_tok.preprocess([path])
    left = to_pil(tiny_tok.target(pixels)[0])
    right = to_pil(tiny_tok.decode(tiny_tok.encode(pixels).ids)[0])
    assert pixels_equal_within(pair.crop((0, 0, 112, 112)), left, 0)
    assert pixels_equal_within(pair.crop((112, 0, 224, 112)), right, 1)
    # and the reconstruction is what /decode gives for the ids /encode gives
    assert pixels_equal_within(pair.crop((112, 0, 224, 112)), client.decode(client.encode(path).ids[0]), 0)


def test_health_and_info(client, tiny_tok, saved_tok):
    health = client.health()
    assert health["status"] == "ok" and health["stats"]["queued_images"] == 0
    info = client.info()
    assert info["version"] == libra_tok.__version__
    assert info["preset"] == "tiny" and info["source"] == str(saved_tok)
    assert info["config"] == tiny_tok.config.to_dict()
    assert (info["resolution"], info["grid"], info["num_tokens"]) == (112, 8, 64)
    assert (info["num_codebooks"], info["codebook_size"], info["feature_dim"]) == (2, 512, 192)
    assert info["device"] == "cpu"
    assert info["serve"]["max_batch"] == 8 and info["serve"]["max_body_bytes"] == 4 * 1024 * 1024


# ---- bad input: a 4xx with a JSON error, and the server keeps answering ------------------------


def _multipart(files):
    boundary = "b0undary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n\r\n'.encode()
             + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _ids_json(ids) -> str:
    return json.dumps({"ids": ids})


GOOD = (ROOT / "assets" / "chelsea.png").read_bytes()
GRID = [[1, 2]] * 64
OUT_OF_RANGE = [[1, 2]] * 5 + [[3, 512]] + [[1, 2]] * 58
BOMB = png_bytes(Image.new("RGB", (2000, 1500), (9, 9, 9)))  # 3 M pixels in a few kB

BAD_REQUESTS = {
    "not an image": ("/encode", *_multipart([("notes.txt", b"hello")]), 400, r"image 0 \(notes.txt\): not an image"),
    "truncated image": ("/encode", GOOD[:300], "image/png", 400, r"image 0: corrupt image"),
    "empty body": ("/encode", b"", "image/png", 400, r"image 0: empty"),
    "decompression bomb": ("/encode", BOMB, "image/png", 413, r"too many pixels \(2000x1500 > 2500000\)"),
    "body too large": ("/encode", b"\0" * (4 * 1024 * 1024 + 1), "image/png", 413,
                       r"request body too large \(4194305 bytes, limit 4194304 bytes = 4 MB\).*--max-body-mb"),
    "invalid json": ("/encode", b'{"images": [', "application/json", 400, r"not valid JSON"),
    "invalid base64": ("/encode", json.dumps({"images": ["@@@"]}), "application/json", 400,
                       r"images\[0\] is not valid base64"),
    "json without images": ("/encode", json.dumps({"pictures": []}), "application/json", 422,
                            r'expected a JSON object \{"images"'),
    "images not a list": ("/encode", json.dumps({"images": "abc"}), "application/json", 422, r"must be a list"),
    "no images": ("/encode", json.dumps({"images": []}), "application/json", 422, r"holds no image"),
    "too many images": ("/encode", *_multipart([(f"{i}.png", GOOD) for i in range(13)]), 413,
                        r"too many images in one request \(13 > max_images 12\)"),
    "bad features flag": ("/encode", json.dumps({"image": base64.b64encode(GOOD).decode(), "features": "maybe"}),
                          "application/json", 422, r"features must be true or false"),
    "unsupported type": ("/encode", b"hello", "text/plain", 415, r"unsupported Content-Type 'text/plain'"),
    "wrong codebooks": ("/decode", _ids_json([[1, 2, 3]] * 64), "application/json", 422,
                        r"ids must have shape \(64, 2\) for one image or \(B, 64, 2\) for several, got \(64, 3\)"),
    "wrong grid": ("/decode", _ids_json([[1, 2]] * 576), "application/json", 422, r"got \(576, 2\)"),
    "flat ids": ("/decode", _ids_json(list(range(128))), "application/json", 422, r"got \(128,\)"),
    "id too large": ("/decode", _ids_json(OUT_OF_RANGE), "application/json", 422,
                     r"ids must be in \[0, 512\); found 512 at index \[5, 1\] \(1 out of range\)"),
    "negative id": ("/decode", _ids_json([GRID, [[-1, 2]] + GRID[1:]]), "application/json", 422,
                    r"found -1 at index \[1, 0, 0\]"),
    "float ids": ("/decode", _ids_json([[1.5, 2]] * 64), "application/json", 422, r"must be integers .*got floats"),
    "boolean ids": ("/decode", _ids_json([[True, False]] * 64), "application/json", 422, r"got booleans"),
    "ragged ids": ("/decode", _ids_json([[1, 2]] * 63 + [[1]]), "application/json", 422, r"rectangular"),
    "no ids": ("/decode", json.dumps({"grid": GRID}), "application/json", 422, r'expected a JSON object \{"ids"'),
    "too many grids": ("/decode", _ids_json([GRID] * 13), "application/json", 413,
                       r"too many id grids in one request \(13 > max_images 12\)"),
    "decode not json": ("/decode", b"1,2", "text/csv", 415, r"/decode takes application/json"),
    "reconstruct two": ("/reconstruct", *_multipart([("a.png", GOOD), ("b.png", GOOD)]), 422,
                        r"exactly one image, got 2"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_with_a_json_error(server, client, case):
    path, body, ctype, status, message = BAD_REQUESTS[case]
    got_status, got = raw_post(server.url, path, body, ctype)
    assert (got_status, got["status"]) == (status, status), got
    assert re.search(message, got["error"]), got["error"]
    assert client.health()["status"] == "ok"


def test_bad_requests_do_not_stop_the_server(server, client, tiny_tok, asset_images):
    before = client.health()["stats"]
    with pytest.raises(ServerError) as err:
        client.request("GET", "/nope")
    assert err.value.status == 404 and "POST /encode" in err.value.message
    with pytest.raises(ServerError) as err:
        client.request("GET", "/encode")
    assert err.value.status == 405
    # a chunked body has no Content-Length: the limit applies while it streams in
    chunks = (b"\0" * (1 << 20) for _ in range(6))
    status, body = raw_post(server.url, "/encode", chunks, "image/png", chunked=True)
    assert status == 413 and "more than 4194304 bytes" in body["error"]
    after = client.health()["stats"]
    assert after["rejected"] - before["rejected"] == 3
    ref = tiny_tok.encode(tiny_tok.preprocess(asset_images[:1])).ids
    assert np.array_equal(client.encode(asset_images[0]).ids, ref.numpy())


def test_a_failing_forward_pass_fails_only_its_request(server, client, monkeypatch):
    tok = server.app.state.batcher.tokenizer

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(tok, "decode", broken)
    with pytest.raises(ServerError) as err:
        client.decode(GRID)
    assert err.value.status == 500 and "decode failed: RuntimeError: simulated device failure" in err.value.message
    monkeypatch.undo()
    assert client.decode(GRID).size == (112, 112)
    assert client.health()["status"] == "ok"


# ---- concurrency and batching -----------------------------------------------------------------


def test_concurrent_clients_share_forward_passes(server, tiny_tok, asset_images):
    images = [load_image(p).resize((96, 72)) for p in asset_images[:4]]  # distinct, small
    ref = tiny_tok.encode(tiny_tok.preprocess(images)).ids.numpy()
    before = server.stats
    results = []

    def one_client(k: int) -> None:
        client = TokenizerClient(server.url, timeout=60)
        for r in range(20):
            i = (k + r) % len(images)
            results.append((i, client.encode(images[i]).ids[0]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one_client, range(8)))  # re-raises any client's error
    after = server.stats
    assert len(results) == 160
    assert all(np.array_equal(ids, ref[i]) for i, ids in results)  # every answer went to its request
    assert after["images_encoded"] - before["images_encoded"] == 160
    passes = after["encode_passes"] - before["encode_passes"]
    assert 160 / CONFIG.max_batch <= passes < 160
    assert after["largest_batch"] > 1


def test_batcher_fills_batches_and_splits_large_jobs(tiny_tok, tiny_pixels):
    ref = tiny_tok.encode(tiny_pixels).ids

    async def scenario():
        batcher = Batcher(tiny_tok, ServeConfig(max_batch=2, max_wait_ms=60_000))
        await batcher.start()
        try:
            singles = await asyncio.gather(*(batcher.encode(tiny_pixels[i:i + 1]) for i in range(3)))
            passes_for_singles = batcher.stats["encode_passes"]
            big_ids, big_features = await batcher.encode(tiny_pixels, features=True)
            return singles, passes_for_singles, big_ids, big_features, dict(batcher.stats)
        finally:
            await batcher.stop()

    singles, passes_for_singles, big_ids, big_features, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    # three one-image jobs with max_batch 2 and nothing else on its way: a full pass, then the
    # rest at once (a minute's max_wait would time the test out)
    assert passes_for_singles == 2
    assert all(torch.equal(ids, ref[i:i + 1]) and features is None for i, (ids, features) in enumerate(singles))
    # a 4-image job runs as two passes of 2
    assert stats["encode_passes"] == 4 and stats["images_encoded"] == 7 and stats["largest_batch"] == 2
    assert torch.equal(big_ids, ref) and big_features.shape == (4, 64, 192) and big_features.dtype == torch.float16


def test_batcher_waits_for_requests_on_their_way(tiny_tok, tiny_pixels):
    ref = tiny_tok.encode(tiny_pixels[:2]).ids

    async def scenario():
        batcher = Batcher(tiny_tok, ServeConfig(max_batch=4, max_wait_ms=60_000))
        await batcher.start()
        try:
            with batcher.expecting():  # a second request is being read and preprocessed
                first = asyncio.create_task(batcher.encode(tiny_pixels[:1]))
                await asyncio.sleep(0.05)
                passes_while_expecting = batcher.stats["encode_passes"]
            second = await batcher.encode(tiny_pixels[1:2])  # it arrives: both share one pass
            return passes_while_expecting, await first, second, dict(batcher.stats)
        finally:
            await batcher.stop()

    passes_while_expecting, first, second, stats = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert passes_while_expecting == 0
    assert stats["encode_passes"] == 1 and stats["largest_batch"] == 2
    assert torch.equal(first[0], ref[:1]) and torch.equal(second[0], ref[1:])


# ---- configuration, client and command line --------------------------------------------------


def test_serve_config_is_validated():
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms must be >= 0"):
        ServeConfig(max_wait_ms=-1)
    with pytest.raises(ValueError, match="precision must be one of"):
        ServeConfig(precision="fp8")


def test_busy_port_and_unreachable_server_are_explained():
    with bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port}: .*choose another port"):
            bind("127.0.0.1", port)
    with pytest.raises(ConnectionError, match=rf"cannot reach the libra-tok server at http://127.0.0.1:{port}"):
        TokenizerClient(f"http://127.0.0.1:{port}").health()
    with pytest.raises(ValueError, match="expected a server URL"):
        TokenizerClient("127.0.0.1:8000")


def test_cli_help_explains_every_option_and_defaults_match():
    result = CliRunner().invoke(serve_command, ["--help"])
    assert result.exit_code == 0
    for param in serve_command.params:
        if param.name != "help":
            assert param.help and param.opts[0] in result.output, param.name
    defaults = {p.name: p.default for p in serve_command.params}
    config = ServeConfig()
    for name in ("max_batch", "max_wait_ms", "max_body_mb", "max_pixels", "max_images", "max_queue", "precision"):
        assert defaults[name] == getattr(config, name), name
    assert defaults["host"] == "127.0.0.1"


@pytest.mark.parametrize("args", [[], ["--preset", "tiny", "--checkpoint", "."]])
def test_cli_needs_exactly_one_tokenizer(args):
    result = CliRunner().invoke(serve_command, args)
    assert result.exit_code == 2 and "exactly one of --checkpoint PATH" in result.output


@pytest.mark.slow  # a fresh interpreter importing torch: 5 s here, more on a busy machine
def test_cli_serves_a_checkpoint_until_interrupted(saved_tok, tiny_tok, asset_images):
    cmd = [sys.executable, "-m", "cli.tok_serve", "--checkpoint", str(saved_tok), "--port", "0",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving (\S+) on (http://127\.0\.0\.1:\d+) ", line)
        assert match and match.group(1) == str(saved_tok), line + proc.stderr.read()
        client = TokenizerClient(match.group(2), timeout=60)
        assert client.info()["source"] == str(saved_tok)
        ref = tiny_tok.encode(tiny_tok.preprocess(asset_images[:1])).ids
        assert np.array_equal(client.encode(asset_images[0]).ids, ref.numpy())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
