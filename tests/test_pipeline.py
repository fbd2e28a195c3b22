"""encode / decode / reconstruct / verify: id shards that survive bad inputs and SIGKILL."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli.tok import main
from libra_tok.data import ImageRecord, list_images
from libra_tok.pipeline import decode_shards, encode_images, load_tokenizer, reconstruct_images
from libra_tok.preprocess import to_pil
from libra_tok.shards import open_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(preset="tiny", device="cpu")


def direct_ids(tok, paths):
    with torch.no_grad():
        return tok.encode(tok.preprocess(paths)).ids


@pytest.fixture
def mixed_folder(tmp_path, asset_images):
    root = tmp_path / "mixed"
    (root / "nested" / "deeper").mkdir(parents=True)
    for p in asset_images[:5]:
        shutil.copy(p, root / p.name)
    shutil.copy(asset_images[5], root / "nested" / "deeper" / asset_images[5].name)
    with Image.open(asset_images[6]) as im:  # other formats of a real photo
        im.convert("RGB").save(root / "nested" / "photo.webp")
        im.save(root / "photo.bmp")
        im.save(root / "photo.tiff")
        im.convert("P").save(root / "photo.gif")
    jpg = (ROOT / "assets" / "rocket.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not a png")
    Image.new("L", (3000, 2000)).save(root / "huge.png")  # refused with max_pixels below
    return root


GOOD = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "nested/deeper/grass.png",
        "nested/photo.webp", "photo.bmp", "photo.gif", "photo.tiff"]


def test_mixed_folder_encodes_good_and_lists_bad(tok, mixed_folder, tmp_path):
    summary = encode_images([mixed_folder], tmp_path / "shards", tok, batch_size=3, shard_size=5, num_workers=0,
                            max_pixels=5_000_000, progress=False, save_features=True)
    shards = open_shards(tmp_path / "shards")
    assert len(shards) == summary.samples == len(GOOD)
    sources = [Path(s.meta["source"]).relative_to(mixed_folder).as_posix() for s in shards]
    assert sorted(sources) == sorted(GOOD)
    expected = direct_ids(tok, [mixed_folder / s for s in sources])
    got = torch.from_numpy(np.stack([s.ids for s in shards]).astype(np.int64))
    assert torch.equal(got, expected)  # exactly the ids of ImageTokenizer.encode
    # Features are stored as float16 of the same CLIP features.
    feats = tok.encode(tok.preprocess([mixed_folder / sources[0]])).features[0]
    np.testing.assert_array_equal(shards[0].features, feats.half().numpy())
    reasons = {Path(f["source"]).name: f["reason"] for f in shards.failed}
    assert set(reasons) == {"truncated.jpg", "empty.png", "text.png", "huge.png"}
    assert reasons["empty.png"] == "empty file" and reasons["text.png"] == "not an image"
    assert reasons["truncated.jpg"].startswith("corrupt image") and reasons["huge.png"].startswith("too many pixels")
    assert len(summary.failed) == 4
    assert shards[0].meta["width"] > 0 and shards.verify() == []


def test_captions_csv(tmp_path, asset_images):
    from libra_tok.data import list_images

    for p in asset_images[:2]:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "captions.csv").write_text(f"image,text\n{asset_images[1].name},\"a photo, with a comma\"\n")
    records = list_images([tmp_path])
    assert [r.caption for r in records] == [None, "a photo, with a comma"]
    (tmp_path / "captions.csv").unlink()
    (tmp_path / "captions.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:1: not a JSON object"):
        list_images([tmp_path])


def test_permission_denied_is_recorded(tok, tmp_path, asset_images, monkeypatch):
    for p in asset_images[:2]:
        shutil.copy(p, tmp_path / p.name)
    real = ImageRecord.read_bytes

    def read_bytes(self):
        if self.source.endswith(asset_images[1].name):
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(ImageRecord, "read_bytes", read_bytes)
    summary = encode_images([tmp_path], tmp_path / "out", tok, num_workers=0, progress=False)
    assert summary.samples == 1 and summary.failed[0]["reason"] == "permission denied"


def test_captions_and_tar_shards(tok, tmp_path, asset_images):
    folder = tmp_path / "f"
    folder.mkdir()
    for p in asset_images[:3]:
        shutil.copy(p, folder / p.name)
    (folder / f"{asset_images[0].stem}.txt").write_text("from a sidecar\n")
    (folder / "captions.jsonl").write_text(json.dumps({"file": asset_images[1].name, "caption": "from jsonl"}) + "\n")
    tar_path = tmp_path / "data-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, p, cap in (("0001", asset_images[3], b'{"caption": "tar json"}'), ("0002", asset_images[4], None)):
            tar.add(p, arcname=f"{key}{p.suffix}")
            if cap:
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(cap)
                tar.addfile(info, io.BytesIO(cap))
        txt = b"tar text"
        info = tarfile.TarInfo("0002.txt")
        info.size = len(txt)
        tar.addfile(info, io.BytesIO(txt))
    encode_images([folder, tar_path], tmp_path / "out", tok, num_workers=0, progress=False)
    shards = open_shards(tmp_path / "out")
    captions = [s.meta.get("caption") for s in shards]
    assert captions == ["from a sidecar", "from jsonl", None, "tar json", "tar text"]
    assert shards[3].meta["member"] == "0001.png" and shards[3].meta["source"] == str(tar_path)
    from libra_tok.data import ImageRecord, read_image

    again = read_image(ImageRecord.from_meta(shards[3].meta))  # tar member read back by offset
    with Image.open(asset_images[3]) as im:
        assert np.array_equal(np.asarray(again), np.asarray(im.convert("RGB")))
    expected = direct_ids(tok, [asset_images[3], asset_images[4]])
    got = torch.from_numpy(np.stack([shards[3].ids, shards[4].ids]).astype(np.int64))
    assert torch.equal(got, expected)


def test_ranks_write_disjoint_shards(tok, tmp_path, assets_dir):
    for rank in (0, 1):
        encode_images([assets_dir], tmp_path / "split", tok, shard_size=3, rank=rank, world_size=2, num_workers=0,
                      progress=False)
    encode_images([assets_dir], tmp_path / "one", tok, shard_size=3, num_workers=0, progress=False)
    for shard in sorted((tmp_path / "one").iterdir()):
        for f in shard.iterdir():
            assert f.read_bytes() == (tmp_path / "split" / shard.name / f.name).read_bytes(), f
    only_rank0 = encode_images([assets_dir], tmp_path / "r0", tok, shard_size=3, rank=0, world_size=2,
                               num_workers=0, progress=False)
    assert only_rank0.shards_written == [0, 2]


def test_changed_inputs_are_refused(tok, tmp_path, assets_dir, asset_images):
    encode_images([assets_dir], tmp_path / "out", tok, shard_size=4, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="another input list"):
        encode_images(asset_images[:5], tmp_path / "out", tok, shard_size=4, num_workers=0, progress=False)


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, asset_images):
    data = tmp_path / "data"
    data.mkdir()
    for copy in range(6):  # 60 images, 15 shards of 4
        for p in asset_images:
            shutil.copy(p, data / f"{copy}_{p.name}")
    cmd = [sys.executable, "-m", "cli.tok", "encode", str(data), "--preset", "tiny", "--device", "cpu",
           "--shard-size", "4", "--batch-size", "2", "--num-workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "shard-00002").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (tmp_path / "killed").glob("shard-*"))
    assert 0 < len(done) < 15, "the kill should land in the middle of the run"
    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], cwd=ROOT, env=env, check=True, capture_output=True)
    killed, clean = _tree(tmp_path / "killed"), _tree(tmp_path / "clean")
    assert len(clean) == 15 * 3 and killed == clean  # no temporaries left, every byte equal


def test_verify_detects_a_flipped_byte(tok, tmp_path, assets_dir):
    encode_images([assets_dir], tmp_path / "out", tok, shard_size=5, num_workers=0, progress=False)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(tmp_path / "out")])
    assert ok.exit_code == 0 and "2 shards, 10 samples" in ok.output
    ids = tmp_path / "out" / "shard-00001" / "ids.u16"
    data = bytearray(ids.read_bytes())
    data[100] ^= 0x01
    ids.write_bytes(bytes(data))
    bad = runner.invoke(main, ["verify", str(tmp_path / "out")])
    assert bad.exit_code == 1
    assert "shard-00001/ids.u16: sha256 differs" in bad.output and "1 problem(s)" in bad.output


def test_decode_round_trip(tok, tmp_path, assets_dir):
    encode_images([assets_dir], tmp_path / "out", tok, shard_size=4, num_workers=0, progress=False)
    written = decode_shards(tmp_path / "out", tmp_path / "png", tok, indices=[1, 6], progress=False)
    assert [p.name for p in written] == ["0000001_brick.png", "0000006_gravel.png"]
    shards = open_shards(tmp_path / "out")
    expected = tok.decode(torch.from_numpy(shards[6].ids.astype(np.int64))[None])[0]
    # Decoded in a batch of two vs alone: float rounding may move a pixel by one level.
    diff = np.abs(np.asarray(Image.open(written[1])).astype(int) - np.asarray(to_pil(expected)).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    with pytest.raises(IndexError, match="out of range for 10 samples"):
        decode_shards(tmp_path / "out", tmp_path / "png", tok, indices=[10], progress=False)


def test_reconstruct_outputs(tok, tmp_path, asset_images):
    result = reconstruct_images(asset_images[:3], tmp_path / "rec", tok, num_workers=0, progress=False)
    assert [r["file"] for r in result.rows] == [p.stem + ".png" for p in asset_images[:3]]
    with Image.open(tmp_path / "rec" / result.rows[0]["file"]) as im:
        assert im.size == (3 * 112 + 4 * 4, 112 + 2 * 4)  # original | reconstruction | error heatmap
    pixels = tok.preprocess(asset_images[:3])
    recon = tok.decode(tok.encode(pixels).ids)
    mse = (((recon - tok.target(pixels)) / 2) ** 2).flatten(1).mean(1)
    expected = (10 * torch.log10(1 / mse)).tolist()
    assert [r["psnr"] for r in result.rows] == pytest.approx(expected, abs=1e-3)
    table = (tmp_path / "rec" / "psnr.csv").read_text().splitlines()
    assert table[0] == "name,psnr,file" and len(table) == 4
    assert result.contact_sheet.is_file()


def test_cli_encode_summary(tmp_path, mixed_folder):
    res = CliRunner().invoke(main, ["encode", str(mixed_folder), "--out", str(tmp_path / "o"), "--preset", "tiny",
                                    "--num-workers", "0", "--max-pixels", "5000000", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "10 images encoded" in res.output and "4 unreadable input(s)" in res.output
    assert "1 empty file" in res.output and "1 not an image" in res.output
