"""The offline walkthrough of the README, command by command: `libra-tok encode` -> a tiny text
tokenizer -> `libra-lm train` (pretrain, then sft) -> `libra-lm generate`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import ROOT

ANSWERS = {
    "astronaut.png": "an astronaut in a white suit",
    "chelsea.png": "a cat looking at the camera",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "a rocket launching into the sky",
}


def run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_encode_train_generate_offline(tmp_path, assets_dir):
    images = tmp_path / "images"
    images.mkdir()
    for name in ANSWERS:
        shutil.copy(assets_dir / name, images / name)
    (images / "captions.jsonl").write_text("".join(json.dumps({"file": n, "caption": c.capitalize()}) + "\n"
                                                   for n, c in ANSWERS.items()))
    (tmp_path / "chat.json").write_text(json.dumps([
        {"id": n, "image": f"images/{n}", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": c}]}
        for n, c in ANSWERS.items()]))

    out = run("libra_cli.tok", "encode", "images", "--out", "shards", "--preset", "tiny", "--save-features",
              "--num-workers", "0", cwd=tmp_path)
    assert "4 images encoded" in out
    out = run("libra_cli.lm", "train-text-tokenizer", "shards", "chat.json", "--out", "tokenizer.model", cwd=tmp_path)
    assert "newline id 13" in out
    common = ["--grad-accum", "1", "--batch-size", "4", "--lr", "3e-3", "--num-workers", "0", "--log-every", "10",
              "--no-gradient-checkpointing"]
    out = run("libra_cli.lm", "train", "shards", "--preset", "tiny", "--text-tokenizer", "tokenizer.model",
              "--out-dir", "pretrain", "--steps", "20", *common, cwd=tmp_path)
    assert "trained 20 steps" in out
    rows = [json.loads(x) for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_image"] < rows[0]["loss_image"]
    out = run("libra_cli.lm", "train", "--stage", "sft", "chat.json", "--image-shards", "shards", "--init-from",
              "pretrain/final", "--out-dir", "sft", "--steps", "80", *common, cwd=tmp_path)
    assert "trained 80 steps" in out and (tmp_path / "sft" / "loss.png").is_file()
    # The tiny LM memorises its four answers; greedy decoding gives them back, image by image.
    # The model folder records the image tokenizer of its shards: no --tokenizer is needed.
    for name in ("chelsea.png", "rocket.jpg"):
        answer = run("libra_cli.lm", "generate", "--model", "sft/final", "--image", f"images/{name}",
                     "--prompt", "What is in the image?", "--max-new-tokens", "80", "--device", "cpu", cwd=tmp_path)
        assert answer.strip() == ANSWERS[name]
