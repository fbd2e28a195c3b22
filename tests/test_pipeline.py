"""encode / decode / reconstruct / verify: id shards that survive bad inputs and SIGKILL."""

import io
import json
import os
import re
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

from builders import ROOT
from libra_cli.tok import main
from libra_tok.data import ImageRecord, list_images
from libra_tok.pipeline import decode_shards, encode_to_shards, load_tokenizer, reconstruct_images
from libra_tok.preprocess import to_pil
from libra_tok.shards import open_shards


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
    summary = encode_to_shards([mixed_folder], tmp_path / "shards", tok, batch_size=3, shard_size=5, num_workers=0,
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
    summary = encode_to_shards([tmp_path], tmp_path / "out", tok, num_workers=0, progress=False)
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
    encode_to_shards([folder, tar_path], tmp_path / "out", tok, num_workers=0, progress=False)
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
        encode_to_shards([assets_dir], tmp_path / "split", tok, shard_size=3, rank=rank, world_size=2, num_workers=0,
                      progress=False)
    encode_to_shards([assets_dir], tmp_path / "one", tok, shard_size=3, num_workers=0, progress=False)
    for shard in sorted((tmp_path / "one").iterdir()):
        for f in shard.iterdir():
            assert f.read_bytes() == (tmp_path / "split" / shard.name / f.name).read_bytes(), f
    only_rank0 = encode_to_shards([assets_dir], tmp_path / "r0", tok, shard_size=3, rank=0, world_size=2,
                               num_workers=0, progress=False)
    assert only_rank0.shards_written == [0, 2]


def test_changed_inputs_are_refused(tok, tmp_path, assets_dir, asset_images):
    encode_to_shards([assets_dir], tmp_path / "out", tok, shard_size=4, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="another input list"):
        encode_to_shards(asset_images[:5], tmp_path / "out", tok, shard_size=4, num_workers=0, progress=False)


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, asset_images):
    data = tmp_path / "data"
    data.mkdir()
    for copy in range(6):  # 60 images, 15 shards of 4
        for p in asset_images:
            shutil.copy(p, data / f"{copy}_{p.name}")
    cmd = [sys.executable, "-m", "libra_cli.tok", "encode", str(data), "--preset", "tiny", "--device", "cpu",
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
    # 15 shards of manifest.json, ids.u16, meta.jsonl, meta.idx; no temporaries left, every byte equal
    assert len(clean) == 15 * 4 and killed == clean


def test_verify_detects_a_flipped_byte(tok, tmp_path, assets_dir):
    encode_to_shards([assets_dir], tmp_path / "out", tok, shard_size=5, num_workers=0, progress=False)
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
    encode_to_shards([assets_dir], tmp_path / "out", tok, shard_size=4, num_workers=0, progress=False)
    written = decode_shards(tmp_path / "out", tmp_path / "png", tok, indices=[1, 6], progress=False)
    assert [p.name for p in written] == ["0000001_brick.png", "0000006_gravel.png"]
    shards = open_shards(tmp_path / "out")
    expected = tok.decode(torch.from_numpy(shards[6].ids.astype(np.int64))[None])[0]
    # Decoded in a batch of two vs alone: float rounding may move a pixel by one level.
    diff = np.abs(np.asarray(Image.open(written[1])).astype(int) - np.asarray(to_pil(expected)).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    with pytest.raises(ValueError, match=r"sample index 10 is out of range: .* holds 10 samples, numbered 0-9"):
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


# ---- reruns never mix shards of different contents --------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(save_features=False),
     r"shard-0000[02] was written with --save-features; rerun with --save-features to resume"),
    (dict(precision="bf16"), r"shard-0000[02] was written with --precision fp32 \(this run: bf16\).*rerun with "
                             r"--precision fp32"),
    (dict(max_pixels=1000), r"shard-0000[02] was written with --max-pixels 268435456 \(this run: 1000\)"),
])
def test_rerun_that_changes_shard_contents_is_refused(tok, tmp_path, assets_dir, change, message):
    out = tmp_path / "out"
    base = dict(shard_size=3, num_workers=0, progress=False, save_features=True)
    encode_to_shards([assets_dir], out, tok, rank=0, world_size=2, **base)  # shards 0 and 2
    # Rank 1 checks the shards of rank 0 too, and a plain rerun checks its own.
    for rank, world in ((1, 2), (0, 1)):
        with pytest.raises(ValueError, match=message):
            encode_to_shards([assets_dir], out, tok, rank=rank, world_size=world, **{**base, **change})
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000", "shard-00002"]  # nothing written
    summary = encode_to_shards([assets_dir], out, tok, rank=1, world_size=2, **base)  # the same options resume
    assert summary.shards_written == [1, 3] and open_shards(out).has_features


def test_rerun_with_another_tokenizer_is_refused(tok, tmp_path, assets_dir):
    encode_to_shards([assets_dir], tmp_path / "out", tok, shard_size=4, rank=0, world_size=2, num_workers=0,
                  progress=False)
    torch.manual_seed(1)
    other = load_tokenizer(preset="tiny", device="cpu")
    other.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in tok.state_dict().items()})
    with pytest.raises(ValueError, match=r"shard-00000 was written by another tokenizer \(a --preset, weights sha256 "
                                         r"[0-9a-f]{12}; this run's: [0-9a-f]{12}\); use the same --checkpoint"):
        encode_to_shards([assets_dir], tmp_path / "out", other, shard_size=4, rank=1, world_size=2, num_workers=0,
                      progress=False)


# ---- argument validation ------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "Invalid value for '--batch-size': 0 is not in the range x>=1"),
    (["--shard-size", "0"], "Invalid value for '--shard-size': 0 is not in the range x>=1"),
    (["--num-shards", "0"], "Invalid value for '--num-shards': 0 is not in the range x>=1"),
    (["--num-workers", "-1"], "Invalid value for '--num-workers': -1 is not in the range x>=0"),
    (["--max-pixels", "0"], "Invalid value for '--max-pixels': 0 is not in the range x>=1"),
    (["--world-size", "0"], "Invalid value for '--world-size': 0 is not in the range x>=1"),
])
def test_encode_options_are_checked_when_parsed(tmp_path, asset_images, args, message):
    res = CliRunner().invoke(main, ["encode", str(asset_images[0]), "--out", str(tmp_path / "o"), "--preset", "tiny",
                                    *args])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("indices, message", [
    ("3-1", "the range '3-1' runs backwards; write 1-3"),
    ("1,,2", "'' is not a sample number or range"),
    ("-3", "'-3' is not a sample number or range"),
    ("1-2-3", "'1-2-3' is not a sample number or range"),
    ("a", "'a' is not a sample number or range"),
    ("", "'' is not a sample number or range"),
    ("1" * 5000, "is not a sample number or range"),
])
def test_decode_indices_are_checked_when_parsed(tmp_path, indices, message):
    (tmp_path / "shards").mkdir()
    res = CliRunner().invoke(main, ["decode", str(tmp_path / "shards"), "--out", str(tmp_path / "png"),
                                    "--indices", indices])
    assert res.exit_code == 2 and "Invalid value for '--indices'" in res.output and message in res.output


def test_library_functions_check_their_arguments(tok, tmp_path, asset_images):
    from libra_tok.pipeline import plan_shards

    assert plan_shards(10, shard_size=4) == [(0, 4), (4, 8), (8, 10)] and plan_shards(10) == [(0, 10)]
    for kwargs, message in ((dict(shard_size=0), "shard_size must be an integer >= 1, got 0"),
                            (dict(shard_size=-2), "shard_size must be an integer >= 1, got -2"),
                            (dict(num_shards=0), "num_shards must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            plan_shards(10, **kwargs)
    one = asset_images[:1]
    for kwargs, message in ((dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
                            (dict(shard_size=0), "shard_size must be an integer >= 1, got 0"),
                            (dict(num_workers=-1), "num_workers must be an integer >= 0, got -1"),
                            (dict(max_pixels=0), "max_pixels must be an integer >= 1, got 0"),
                            (dict(precision="fp8"), "precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
                            (dict(world_size=0, rank=0), "world size must be >= 1, got 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            encode_to_shards(one, tmp_path / "o", tok, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        reconstruct_images(one, tmp_path / "r", tok, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        decode_shards(tmp_path / "o", tmp_path / "png", tok, batch_size=0)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


# ---- one-line errors -------------------------------------------------------------------------------
def test_out_under_a_file_is_a_one_line_error(tmp_path, asset_images):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    encoded = tmp_path / "shards"
    assert CliRunner().invoke(main, ["encode", str(asset_images[0]), "--out", str(encoded), "--preset", "tiny",
                                     "--device", "cpu", "--num-workers", "0"]).exit_code == 0
    for args in (["encode", str(asset_images[0]), "--preset", "tiny"], ["decode", str(encoded), "--preset", "tiny"],
                 ["reconstruct", str(asset_images[0]), "--preset", "tiny"]):
        res = CliRunner().invoke(main, [*args, "--out", str(afile / "sub"), "--device", "cpu"])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert res.stderr.strip().splitlines()[-1] == (f"Error: --out {afile / 'sub'} lies under {afile}, which is a "
                                                       "file, not a folder; choose another --out")


def test_decode_indices_out_of_range_is_a_one_line_error(tmp_path, asset_images):
    encoded = tmp_path / "shards"
    runner = CliRunner()
    assert runner.invoke(main, ["encode", *map(str, asset_images[:2]), "--out", str(encoded), "--preset", "tiny",
                                "--device", "cpu", "--num-workers", "0"]).exit_code == 0
    res = runner.invoke(main, ["decode", str(encoded), "--out", str(tmp_path / "png"), "--indices", "0,1-5",
                               "--preset", "tiny", "--device", "cpu"])
    assert res.exit_code == 1 and res.exception is not None and "Traceback" not in res.output
    assert res.stderr.strip() == f"Error: --indices 5 is out of range: {encoded} holds 2 samples, numbered 0-1"
    assert not (tmp_path / "png").exists()  # checked before any work
    huge = runner.invoke(main, ["decode", str(encoded), "--out", str(tmp_path / "png"),
                                "--indices", "0-99999999999999"])
    assert huge.exit_code == 1 and "--indices 99999999999999 is out of range" in huge.stderr
    ok = runner.invoke(main, ["decode", str(encoded), "--out", str(tmp_path / "png"), "--indices", "1, 0-0",
                              "--preset", "tiny", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        f"0000000_{asset_images[0].stem}.png", f"0000001_{asset_images[1].stem}.png"]


# ---- --trust-pickle --------------------------------------------------------------------------------
def test_trust_pickle_reaches_the_loader(tmp_path, asset_images, monkeypatch):
    from libra_tok.model import ImageTokenizer

    seen = []
    preset = load_tokenizer(preset="tiny", device="cpu")

    def from_pretrained(cls, path, device=None, *, trust_pickle=False):
        seen.append(trust_pickle)
        return preset

    monkeypatch.setattr(ImageTokenizer, "from_pretrained", classmethod(from_pretrained))
    ckpt = tmp_path / "vqgan.ckpt"
    ckpt.write_bytes(b"stands in for an official checkpoint")
    common = ["--checkpoint", str(ckpt), "--device", "cpu"]
    runner = CliRunner()
    for args in (["encode", str(asset_images[0]), "--out", str(tmp_path / "s"), "--num-workers", "0", *common],
                 ["decode", str(tmp_path / "s"), "--out", str(tmp_path / "png"), *common],
                 ["reconstruct", str(asset_images[0]), "--out", str(tmp_path / "r"), "--num-workers", "0", *common],
                 ["info", str(ckpt)]):
        for flag in ([], ["--trust-pickle"]):
            res = runner.invoke(main, [*args, *flag])
            assert res.exit_code == 0, (args, res.output)
    assert seen == [False, True] * 4
    helps = {}
    for command in ("encode", "decode", "reconstruct", "info", "convert-official"):
        option = next(p for p in main.commands[command].params if p.name == "trust_pickle")
        helps[command] = option.help
    assert len(set(helps.values())) == 1 and "only for files you trust" in helps["info"]


# ---- reconstruct never replaces an input ---------------------------------------------------------------
def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_reconstruct_refuses_to_write_over_inputs(tok, tmp_path, asset_images):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in asset_images[:2]:
        shutil.copy(p, imgs / p.name)
    shutil.copy(asset_images[2], imgs / "contact_sheet.png")
    before = _snapshot(imgs)
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(imgs))} is the input folder .*choose another --out"):
        reconstruct_images([imgs], imgs, tok, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="is the input folder"):  # the same folder under another name
        reconstruct_images([imgs], tmp_path / "." / "imgs", tok, num_workers=0, progress=False)
    # The inputs are files: the folder is not an input, but the outputs would replace them.
    with pytest.raises(ValueError, match=rf"writing {asset_images[0].name} would replace the input "
                                         rf"{re.escape(str(imgs / asset_images[0].name))}"):
        reconstruct_images([imgs / asset_images[0].name], imgs, tok, num_workers=0, progress=False)
    with pytest.raises(ValueError, match=r"writing contact_sheet.png would replace the input .*contact_sheet.png"):
        reconstruct_images([tmp_path / "imgs" / "contact_sheet.png", asset_images[3]], imgs, tok, num_workers=0,
                           progress=False)
    res = CliRunner().invoke(main, ["reconstruct", str(imgs), "--out", str(imgs), "--preset", "tiny", "--device", "cpu",
                                    "--num-workers", "0"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1].startswith(f"Error: --out {imgs} is the input folder")
    assert _snapshot(imgs) == before


def test_reconstruct_names_never_collide(tok, tmp_path, asset_images):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    shutil.copy(asset_images[0], imgs / "contact_sheet.png")  # the name of the report
    shutil.copy(asset_images[1], imgs / "Cat.png")
    shutil.copy(asset_images[2], imgs / "sub" / "cat.png")  # the same name on a case-insensitive disk
    shutil.copy(asset_images[3], imgs / "sub" / "Cat.jpg")  # the same stem
    result = reconstruct_images([imgs], tmp_path / "rec", tok, num_workers=0, progress=False)
    files = [r["file"] for r in result.rows]
    assert files == ["Cat.png", "contact_sheet_.png", "Cat_.png", "cat__.png"]
    rec = tmp_path / "rec"
    assert sorted(p.name for p in rec.iterdir()) == sorted(files + ["contact_sheet.png", "psnr.csv"])
    for name in files:  # each its own original | reconstruction | heatmap strip, none replaced by the sheet
        with Image.open(rec / name) as im:
            assert im.size == (3 * 112 + 4 * 4, 112 + 2 * 4)
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.height > 4 * 112


# ---- inputs left out while listing are listed and counted ---------------------------------------------
def _tar_with_truncation(path, images):
    """A tar whose first members are intact and whose last member is cut short."""
    with tarfile.open(path, "w") as tar:
        for i, p in enumerate(images):
            tar.add(p, arcname=f"{i:04d}{p.suffix}")
    data = path.read_bytes()
    last = tarfile.open(path).getmembers()[-1]
    path.write_bytes(data[:last.offset_data + last.size // 2])


def test_encode_lists_and_counts_skipped_inputs(tok, tmp_path, asset_images):
    data = tmp_path / "data"
    data.mkdir()
    for p in asset_images[:2]:
        shutil.copy(p, data / p.name)
    _tar_with_truncation(data / "pack.tar", asset_images[2:5])  # 2 intact members, then damage
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(asset_images[5], outside / asset_images[5].name)
    (data / "linked").symlink_to(outside, target_is_directory=True)  # a symlinked sub-folder: followed
    (data / "loop").symlink_to(data, target_is_directory=True)  # back to an ancestor: a loop
    (data / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["encode", str(data), str(data / asset_images[0].name), "--out", str(out),
                                    "--preset", "tiny", "--device", "cpu", "--num-workers", "0", "--shard-size", "2"])
    assert res.exit_code == 0, res.output
    shards = open_shards(out)
    encoded = [s.meta.get("member") or Path(s.meta["source"]).name for s in shards]
    assert encoded == [asset_images[0].name, asset_images[1].name, asset_images[5].name, "0000.png", "0001.png"]
    skipped = json.loads((out / "skipped_inputs.json").read_text())
    reasons = {(Path(s["source"]).name, s.get("member")): s["reason"] for s in skipped}
    assert len(skipped) == 5 and set(reasons) == {("pack.tar", None), ("pack.tar", "0002.png"), ("loop", None),
                                                  ("gone.png", None), (asset_images[0].name, None)}
    assert reasons["pack.tar", None].startswith("truncated tar: members after byte")
    assert reasons["pack.tar", "0002.png"].startswith("data runs past the end of the file")
    assert reasons["loop", None] == "symlink loop" and reasons["gone.png", None] == "dangling symlink"
    assert reasons[asset_images[0].name, None] == f"duplicate of {data / asset_images[0].name}"
    assert shards.skipped == skipped and shards.verify() == []
    assert "5 images encoded" in res.output
    assert (f"5 input(s) skipped while listing, listed in {out / 'skipped_inputs.json'}: 1 dangling symlink, "
            "1 data runs past the end of the file, 1 duplicate, 1 symlink loop, 1 truncated tar") in res.output
    summary = encode_to_shards([data, data / asset_images[0].name], out, tok, shard_size=2, num_workers=0,
                               progress=False)
    assert summary.shards_already_done == [0, 1, 2] and summary.skipped == skipped  # a rerun reports them again


def test_encode_of_a_30000x1_png_stays_small(tmp_path, asset_images):
    """A 30000x1 image is a few hundred bytes; preprocessing it must not build a 30000x30000 canvas."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (30000, 1), (200, 10, 10)).save(data / "line.png")
    assert (data / "line.png").stat().st_size < 2000
    shutil.copy(asset_images[0], data / asset_images[0].name)
    # The child caps its anonymous memory (RLIMIT_DATA: heap and private mappings, not the shared
    # libraries torch maps) at 1 GB above what it holds after importing everything, and reports
    # the growth of its peak RSS. Whole-process RSS alone is not a bound: how much of torch's
    # libraries a process maps depends on what else has warmed the page cache.
    script = ("import resource, sys\n"
              "from libra_cli.tok import main\n"
              "import libra_tok.pipeline, libra_tok.model\n"
              "data_kb = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmData:'))\n"
              "cap = (data_kb + 1024 * 1024) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n"
              "    main(sys.argv[1:], standalone_mode=False)\n"
              "finally:\n"
              "    print('growth_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    proc = subprocess.run([sys.executable, "-c", script, "encode", str(data), "--out", str(tmp_path / "out"),
                           "--preset", "tiny", "--device", "cpu", "--num-workers", "0"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images encoded" in proc.stdout
    growth_mb = int(proc.stdout.split("growth_kb")[1]) / 1024
    # The tiny model and one batch take well under a few hundred MB; the padded canvas alone would be 2.7 GB.
    assert growth_mb < 600, f"peak RSS grew by {growth_mb:.0f} MB"
