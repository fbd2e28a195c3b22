"""libra_tok.evaluate and `libra-tok eval`: two-folder and tokenizer modes, outputs, errors."""

import csv
import json
import math
import shutil

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from libra_cli.tok_eval import eval_command
from libra_tok.evaluate import EvalOptions, MetricModels, evaluate_folders, evaluate_tokenizer
from libra_tok.metrics import FIDInception, build_lpips
from libra_tok.preprocess import to_pil

QUIET = dict(progress=False, num_workers=0)


def _feature_net():
    """A small stand-in for the Inception (rFID plumbing without its CPU cost)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=4), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()


@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    return MetricModels(lpips={"alex": build_lpips("alex", random_backbone=True)}, inception=_feature_net())


@pytest.fixture()
def folder_pair(tmp_path, asset_images):
    """originals/ (64x64 PNG, nested, one JPEG) and reconstructions/ (noisy PNG copies), plus one
    unreadable reconstruction and one original without a reconstruction."""
    rng = np.random.default_rng(0)
    orig, recon = tmp_path / "originals", tmp_path / "reconstructions"
    arrays = {}
    for i, path in enumerate(asset_images[:5]):
        with Image.open(path) as im:
            square = im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
        rel = f"sub/{path.stem}" if i % 2 else path.stem
        (orig / rel).parent.mkdir(parents=True, exist_ok=True)
        (recon / rel).parent.mkdir(parents=True, exist_ok=True)
        square.save(orig / f"{rel}.png")
        noise = rng.normal(0, 10, (64, 64, 3))
        noisy = np.clip(np.asarray(square, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
        Image.fromarray(noisy).save(recon / f"{rel}.png")
        arrays[rel] = (np.asarray(square), noisy)
    (orig / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(recon / "broken.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(orig / "lonely.png")
    return orig, recon, arrays


def test_folders_match_scikit_image_per_image(folder_pair, small_models):
    orig, recon, arrays = folder_pair
    result = evaluate_folders(orig, recon, EvalOptions(resolution=64, also=(32,), **QUIET), small_models)
    s = result.summary
    assert s["mode"] == "folders" and s["num_images"] == 5 and s["num_failed"] == 1
    assert s["failed"][0]["name"].endswith("broken.png") and s["failed"][0]["reason"].startswith("original:")
    assert s["unmatched_originals"] == 1 and s["unmatched_reconstructions"] == 0
    psnrs, ssims = [], []
    for row in result.rows:
        rel = row["name"].split("originals/")[1].rsplit(".", 1)[0]
        a, b = (x.astype(np.float64) / 255.0 for x in arrays[rel])
        psnrs.append(peak_signal_noise_ratio(a, b, data_range=1))
        ssims.append(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1, channel_axis=-1))
        assert row["psnr_64"] == pytest.approx(psnrs[-1], abs=1e-4)  # float32 CLIP normalisation round trip
        assert row["ssim_64"] == pytest.approx(ssims[-1], abs=1e-5)
        assert row["ssim_uniform7_64"] == pytest.approx(
            structural_similarity(a, b, data_range=1, channel_axis=-1), abs=1e-5)
        assert 0 < row["lpips_alex_64"] and set(row) >= {"psnr_32", "ssim_32", "lpips_alex_32", "reconstruction"}
    m = s["metrics"]
    assert list(m) == ["64", "32"]
    assert m["64"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert m["64"]["ssim"] == pytest.approx(np.mean(ssims), abs=1e-5)
    assert m["32"]["psnr"] != pytest.approx(m["64"]["psnr"], abs=1e-3)  # resized: a different measurement
    assert m["64"]["rfid"] > 0 and m["32"]["rfid"] > 0
    assert "bicubic" in s["protocol"]["also_resize"] and s["protocol"]["resolution"] == 64


def test_folders_identical_images(folder_pair):
    orig, _, _ = folder_pair
    result = evaluate_folders(orig, orig, EvalOptions(resolution=64, also=(48,), **QUIET))
    for r in ("64", "48"):
        assert math.isinf(result.summary["metrics"][r]["psnr"])
        assert result.summary["metrics"][r]["ssim"] == pytest.approx(1.0)
        assert result.summary["metrics"][r]["ssim_uniform7"] == pytest.approx(1.0)
    assert "rfid" not in result.summary["metrics"]["64"]  # no Inception given: rFID not computed


def test_folder_pairing_rules(tmp_path, folder_pair):
    orig, recon, arrays = folder_pair
    # cat.jpg pairs with cat.png: the extension is ignored.
    jpg = tmp_path / "jpg"
    jpg.mkdir()
    for rel in [k for k in sorted(arrays) if "/" not in k][:2]:
        Image.fromarray(arrays[rel][0]).save(jpg / f"{rel}.jpg", quality=95)
    result = evaluate_folders(jpg, recon, EvalOptions(resolution=64, max_images=1, **QUIET))
    assert result.summary["num_images"] == 1 and result.rows[0]["reconstruction"].endswith(".png")
    shutil.copy(orig / "lonely.png", jpg / "lonely.jpg")
    (jpg / "lonely.png").write_bytes((orig / "lonely.png").read_bytes())
    with pytest.raises(ValueError, match="two images for 'lonely'"):
        evaluate_folders(jpg, recon, EvalOptions(resolution=64, **QUIET))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image in .* has a counterpart"):
        evaluate_folders(orig, empty, EvalOptions(**QUIET))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        evaluate_folders(orig, tmp_path / "missing", EvalOptions(**QUIET))


def test_tokenizer_mode_with_tiny_preset(tiny_tok, asset_images, small_models, tmp_path):
    images = asset_images[:4]
    result = evaluate_tokenizer(tiny_tok, images, EvalOptions(batch_size=3, also=(64,), **QUIET), small_models)
    s = result.summary
    assert s["mode"] == "tokenizer" and s["num_images"] == 4 and s["num_failed"] == 0
    assert [r["name"] for r in result.rows] == [str(p) for p in images]
    # Id usage equals the histogram of the ids the tokenizer gives for the same pixels.
    ids = tiny_tok.encode(tiny_tok.preprocess(images)).ids
    for j, cb in enumerate(s["id_usage"]["codebooks"]):
        counts = torch.bincount(ids[..., j].flatten(), minlength=512)
        p = counts[counts > 0].double() / counts.sum()
        assert cb["used"] == int((counts > 0).sum())
        assert cb["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert s["bits_per_pixel"] == pytest.approx(64 * 18 / 112**2)
    entropy = sum(cb["entropy_bits"] for cb in s["id_usage"]["codebooks"])
    assert s["bits_per_pixel_entropy"] == pytest.approx(64 * entropy / 112**2)
    assert s["bits_per_pixel_entropy"] < s["bits_per_pixel"]

    # Saving the reconstructions as PNG and scoring the two folders gives the same numbers:
    # the protocol is one protocol.
    orig, recon = tmp_path / "orig", tmp_path / "recon"
    orig.mkdir()
    recon.mkdir()
    decoded = tiny_tok.decode(ids)
    for path, image in zip(images, decoded, strict=True):
        shutil.copy(path, orig / path.name)
        to_pil(image).save(recon / f"{path.stem}.png")
    options = EvalOptions(resolution=112, also=(64,), pad_mode="pad", **QUIET)
    folders = evaluate_folders(orig, recon, options, small_models)
    by_name = {r["name"].rsplit("/", 1)[1]: r for r in folders.rows}
    for row in result.rows:
        other = by_name[row["name"].rsplit("/", 1)[1]]
        for key in ("psnr_112", "ssim_112", "ssim_uniform7_112", "psnr_64", "ssim_64"):
            assert row[key] == pytest.approx(other[key], abs=1e-4), key
        assert row["lpips_alex_112"] == pytest.approx(other["lpips_alex_112"], abs=1e-4)
    assert s["metrics"]["112"]["rfid"] == pytest.approx(folders.summary["metrics"]["112"]["rfid"], rel=1e-3, abs=1e-7)


def test_tokenizer_mode_reports_unreadable_files_and_options(tiny_tok, asset_images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in asset_images[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    result = evaluate_tokenizer(tiny_tok, [folder], EvalOptions(**QUIET))
    s = result.summary
    assert s["num_images"] == 2 and s["num_failed"] == 1
    assert s["failed"][0]["name"].endswith("zz_broken.jpg") and s["failed"][0]["reason"]
    assert evaluate_tokenizer(tiny_tok, [folder], EvalOptions(max_images=1, **QUIET)).summary["num_images"] == 1
    with pytest.raises(ValueError, match="works at 112 px .* --also 256"):
        evaluate_tokenizer(tiny_tok, [folder], EvalOptions(resolution=256, **QUIET))
    (tmp_path / "empty.txt").write_text("# an image list with no images\n")
    with pytest.raises(ValueError, match="no images found"):
        evaluate_tokenizer(tiny_tok, [tmp_path / "empty.txt"], EvalOptions(**QUIET))


def test_json_and_csv_outputs(folder_pair, tmp_path):
    orig, recon, _ = folder_pair
    result = evaluate_folders(orig, orig, EvalOptions(resolution=64, **QUIET))
    result.write_json(tmp_path / "out" / "eval.json")
    result.write_csv(tmp_path / "out" / "eval.csv")
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())  # standard JSON: inf as a string
    assert summary["metrics"]["64"]["psnr"] == "inf" and summary["num_images"] == result.summary["num_images"]
    with open(tmp_path / "out" / "eval.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.rows) and list(rows[0]) == list(result.rows[0])
    assert float(rows[0]["ssim_64"]) == pytest.approx(1.0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.csv", "eval.json"]  # no temp files left
    table = result.format_table()
    assert "psnr" in table and "64 px" in table and "unreadable" in table


# ---- the command ---------------------------------------------------------------------------


def _run(args, env=None):
    return CliRunner().invoke(eval_command, [str(a) for a in args], env=env, catch_exceptions=False)


def test_help_explains_every_option():
    result = _run(["--help"])
    assert result.exit_code == 0
    for param in eval_command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.name} has no help"
            assert param.opts[0] in result.output
    assert "ORIGINALS RECONSTRUCTIONS" in result.output and "--also 256" in result.output


def test_cli_two_folders_writes_table_json_csv(folder_pair, tmp_path):
    orig, recon, _ = folder_pair
    result = _run([orig, recon, "--resolution", 64, "--also", 32, "--no-fid", "--no-lpips", "--num-workers", 0,
                   "-q", "--json", tmp_path / "e.json", "--csv", tmp_path / "e.csv"])
    assert result.exit_code == 0, result.output
    assert "64 px" in result.output and "32 px" in result.output and "ssim_uniform7" in result.output
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["num_images"] == 5 and summary["num_failed"] == 1
    assert "1 image(s) unreadable" in result.output and "broken.png" in result.output
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 6


def test_cli_tokenizer_mode(tiny_tok, asset_images, tmp_path):
    tiny_tok.save_pretrained(tmp_path / "tok")
    result = _run([*asset_images[:3], "-c", tmp_path / "tok", "--also", 64, "--max-images", 2, "--no-fid",
                   "--no-lpips", "--num-workers", 0, "-q", "--json", tmp_path / "e.json"])
    assert result.exit_code == 0, result.output
    assert "codebook 0" in result.output and "bits per pixel  0.0918" in result.output
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["num_images"] == 2 and list(summary["metrics"]) == ["112", "64"]


def test_cli_errors_are_one_line(folder_pair, tmp_path):
    orig, recon, _ = folder_pair
    # Missing metric weights: named, with where to put them; nothing is downloaded.
    result = _run([orig, recon, "--num-workers", 0], env={"TORCH_HOME": str(tmp_path / "th")})
    assert result.exit_code == 1
    assert result.output.startswith("Error: FID Inception weights ")
    assert "pt_inception-2015-12-05-6726825d.pth" in result.output and "alexnet-owt-7be5be79.pth" in result.output
    assert str(tmp_path / "th" / "hub" / "checkpoints") in result.output and "Traceback" not in result.output
    result = _run([orig, recon, "--no-lpips", "--inception-weights", tmp_path / "nope.pth"])
    assert result.exit_code == 1 and "nope.pth" in result.output and "--inception-weights" in result.output
    # Wrong inputs without a tokenizer.
    result = _run([orig, "--no-fid", "--no-lpips"])
    assert result.exit_code == 2 and "two folders, ORIGINALS RECONSTRUCTIONS" in result.output


@pytest.mark.slow
def test_cli_rfid_and_lpips_from_weight_files(tiny_tok, asset_images, tmp_path):
    """The whole path with files on disk: random FID Inception via --inception-weights, random
    AlexNet trunk found in $TORCH_HOME/hub/checkpoints."""
    import torchvision

    torch.manual_seed(0)
    inception = FIDInception()
    torch.save(inception.net.state_dict(), tmp_path / "inception.pth")
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    trunk = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, cache / "alexnet-owt-7be5be79.pth")
    tiny_tok.save_pretrained(tmp_path / "tok")
    result = _run([*asset_images[:2], "-c", tmp_path / "tok", "--lpips", "alex", "--inception-weights",
                   tmp_path / "inception.pth", "--num-workers", 0, "-q", "--json", tmp_path / "e.json"],
                  env={"TORCH_HOME": str(tmp_path / "th")})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e.json").read_text())
    m = summary["metrics"]["112"]
    assert m["lpips_alex"] > 0 and "inception.pth" in summary["protocol"]["rfid"]
    # rFID equals the Frechet distance of the Inception features of the same two image sets.
    tok_pixels = tiny_tok.preprocess(asset_images[:2])
    originals = ((tiny_tok.target(tok_pixels) + 1) / 2).clamp(0, 1)
    recons = ((tiny_tok.decode(tiny_tok.encode(tok_pixels).ids) + 1) / 2 * 255).round() / 255
    fa, fb = inception(originals).double().numpy(), inception(recons).double().numpy()
    # Two samples: through the Gram matrix, tr sqrt(S1 S2) = ||Ca Cb^T||_* / (n - 1).
    ca, cb = fa - fa.mean(0), fb - fb.mean(0)
    diff = fa.mean(0) - fb.mean(0)
    expected = diff @ diff + (ca**2).sum() + (cb**2).sum() - 2 * np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    assert m["rfid"] == pytest.approx(expected, rel=1e-4) and m["rfid"] > 0


def test_inputs_skipped_while_listing_are_failures(tiny_tok, asset_images, tmp_path, folder_pair):
    import tarfile

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in asset_images[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    with tarfile.open(folder / "pack.tar", "w") as tar:
        for i, p in enumerate(asset_images[2:4]):
            tar.add(p, arcname=f"{i}.png")
    data = (folder / "pack.tar").read_bytes()
    (folder / "pack.tar").write_bytes(data[:len(data) // 2])  # the first member survives
    result = evaluate_tokenizer(tiny_tok, [folder, folder / asset_images[0].name], EvalOptions(**QUIET))
    s = result.summary
    assert s["num_images"] == 3  # two files and the intact tar member, each once
    reasons = {row["name"].rsplit("/", 1)[-1]: row["reason"] for row in s["failed"]}
    assert s["num_failed"] == len(s["failed"]) == 4
    assert reasons["gone.png"] == "dangling symlink"
    assert reasons[asset_images[0].name] == f"duplicate of {folder / asset_images[0].name}"
    assert reasons["pack.tar::1.png"].startswith("data runs past the end of the file")
    assert reasons["pack.tar"].startswith("truncated tar")

    orig, recon, _ = folder_pair
    (orig / "gone.png").symlink_to(tmp_path / "missing.png")
    folders = evaluate_folders(orig, recon, EvalOptions(resolution=64, **QUIET))
    assert folders.summary["num_failed"] == 2
    assert {"name": str(orig / "gone.png"), "reason": "original: dangling symlink"} in folders.summary["failed"]


def test_cli_report_paths_are_checked_before_any_work(folder_pair, tmp_path):
    orig, recon, _ = folder_pair
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    for option in ("--json", "--csv"):
        result = CliRunner().invoke(eval_command, [str(orig), str(recon), "--no-fid", "--no-lpips", "--num-workers",
                                                   "0", "-q", option, str(afile / "report")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output == (f"Error: {option} {afile / 'report'} lies under {afile}, which is a file, not a "
                                 f"folder; choose another {option}\n")  # no table: nothing was computed
