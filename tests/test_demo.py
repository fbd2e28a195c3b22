"""`libra-tok demo`: offline train -> encode -> decode -> grid + PSNR (a short run)."""

import json

from click.testing import CliRunner
from PIL import Image

from libra_cli.tok import main


def test_demo_writes_grid_and_metrics(tmp_path, asset_images):
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert "PSNR" in res.output and "dB mean over 10 images" in res.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["psnr_per_image"]) == len(asset_images)
    assert len(metrics["held_out_images"]) == 2 and metrics["psnr_held_out"] is not None
    assert all(5 < v < 60 for v in metrics["psnr_per_image"].values())
    with Image.open(tmp_path / "demo" / "reconstructions.png") as grid:
        assert grid.size == (2 * 112 + 3 * 4, 10 * 112 + 11 * 4)  # 10 rows of original | reconstruction
    assert (tmp_path / "demo" / "run" / "final" / "model.safetensors").is_file()
    # A second run starts afresh in the same folder.
    again = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--steps", "2"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["steps"] == 2


def test_demo_lists_what_it_could_not_use(tmp_path, asset_images):
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for p in asset_images[:3]:
        shutil.copy(p, images / p.name)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "gone.png").symlink_to(tmp_path / "missing.png")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--images", str(images), "--steps", "1"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert sorted(metrics["psnr_per_image"]) == sorted(p.name for p in asset_images[:3])
    assert metrics["skipped_inputs"] == [{"source": str(images / "gone.png"), "reason": "dangling symlink"},
                                         {"source": str(images / "broken.png"), "reason": "not an image"}]
    assert "2 input(s) unreadable or skipped (1 dangling symlink, 1 not an image)" in res.output


def test_demo_refuses_a_run_without_steps_or_time(tmp_path):
    runner = CliRunner()
    for option, value, expected in (("--steps", "0", "0 is not in the range x>=1"),
                                    ("--max-minutes", "0", "0.0 is not in the range x>0"),
                                    ("--max-minutes", "nan", "nan is not a finite number"),
                                    ("--max-minutes", "inf", "inf is not a finite number")):
        res = runner.invoke(main, ["demo", "--out", str(tmp_path / "d"), option, value])
        assert res.exit_code == 2 and expected in res.output, res.output
        assert not (tmp_path / "d").exists()
