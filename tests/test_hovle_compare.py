"""The tiny comparison recipe of docs/hovle.md, end to end through the CLI, offline on a CPU:
the same tiny LLaMA and shards, Libra pretraining vs HoVLE distill -> align, `libra-lm generate`
and `libra-lm eval` on both final folders, then `libra-lm compare`: both loss curves on one
plot and the eval tables side by side."""

import json

import pytest
from click.testing import CliRunner
from fixtures_eval import bench_root  # noqa: F401  (fixture)

from libra_cli.lm import main
from libra_lm import TextTokenizer
from libra_lm.hovle import HoVLEForCausalLM
from libra_lm.hovle.compare import side_by_side
from libra_lm.hovle.generate import chat
from libra_tok.data import load_image

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
COMMON = ["--preset", "tiny", "--steps", "6", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3",
          "--num-workers", "0", "--log-every", "1", "--no-gradient-checkpointing", "--device", "cpu"]


def run(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def test_tiny_libra_vs_hovle_recipe(tmp_path, shard_dirs, sp, bench_root, asset_images):  # noqa: F811
    with_features = shard_dirs[0]
    runs = tmp_path / "runs"
    run(["train", with_features, "--text-tokenizer", sp, "--out-dir", runs / "libra", *COMMON])
    run(["train", with_features, "--arch", "hovle", "--stage", "distill", "--text-tokenizer", sp,
         "--out-dir", runs / "hovle-distill", *COMMON])
    run(["train", with_features, "--arch", "hovle", "--stage", "align", "--init-from",
         runs / "hovle-distill" / "final", "--out-dir", runs / "hovle-align", *COMMON])

    for name in ("libra", "hovle-align"):
        answer = run(["generate", "--model", runs / name / "final", "--image", asset_images[0], "--prompt",
                      "What is in the image?", "--template", "raw", "--max-new-tokens", "4", "--device", "cpu"])
        if name == "hovle-align":  # the command answers as the library does with the folder's model and pixels
            final = runs / name / "final"
            model = HoVLEForCausalLM.from_pretrained(final)
            tok = TextTokenizer.from_pretrained(final / "tokenizer.model")
            expected = chat(model, tok, ["What is in the image?"], [load_image(asset_images[0])], template="raw",
                            max_new_tokens=4).texts[0].strip()
            assert answer.strip() == expected
        run(["eval", "--model", runs / name / "final", "--tasks", "pope", "--data-root", bench_root,
             "--out", tmp_path / "eval" / name, "--limit", "2", "--max-new-tokens", "2", "--device", "cpu"])
        assert json.loads((tmp_path / "eval" / name / "results.json").read_text())["tasks"]["pope"]["metrics"]

    out = tmp_path / "compare"
    evals = tmp_path / "eval"
    printed = run(["compare", "--run", f"Libra={runs / 'libra'}", "--run", f"HoVLE align={runs / 'hovle-align'}",
                   "--eval", f"Libra={evals / 'libra'}", "--eval", f"HoVLE={evals / 'hovle-align'}", "--out", out])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text().strip()
    assert table == side_by_side({"Libra": tmp_path / "eval" / "libra", "HoVLE": tmp_path / "eval" / "hovle-align"})
    header, rule, *rows = table.splitlines()
    assert header == "| benchmark | Libra | HoVLE |" and rows and all(r.startswith("| POPE") for r in rows)
    assert table in printed


def test_compare_explains_bad_folders(tmp_path):
    res = CliRunner().invoke(main, ["compare", "--run", f"x={tmp_path}", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "is not a training run folder: no metrics.jsonl" in res.output
    res = CliRunner().invoke(main, ["compare", "--run", "nolabel", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "'nolabel' is not LABEL=FOLDER" in res.output
