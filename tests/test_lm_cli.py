"""`libra-lm generate` end to end, offline: image -> libra_tok ids -> LM -> text."""

import re

import click
import pytest
import torch
from click.testing import CliRunner

from cli.lm import main
from libra_lm import LibraForCausalLM, TextTokenizer
from libra_lm.generate import chat, encode_images
from test_lm_model import TINY, randomize_
from test_lm_text import train_tiny_text_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sp = train_tiny_text_tokenizer(root)
    torch.manual_seed(0)
    model = randomize_(LibraForCausalLM(TINY), seed=0, scale=0.3)
    model.save_pretrained(root / "lm")
    (root / "lm" / "tokenizer.model").write_bytes(sp.read_bytes())
    return root, sp


def expected_answer(root, sp, image, prompt, tok, model_dir=None, **kw):
    model = LibraForCausalLM.from_pretrained(model_dir or root / "lm")
    text_tok = TextTokenizer(sp)
    images = encode_images(tok, [image], model.config)
    out = chat(model, text_tok, [prompt], images, generator=torch.Generator().manual_seed(kw.pop("seed", 0)), **kw)
    return out.texts[0].strip()


def test_generate_with_the_tiny_tokenizer_preset(workdir, asset_images, tiny_tok):
    root, sp = workdir
    args = ["generate", "--model", str(root / "lm"), "--text-tokenizer", str(sp), "--image", str(asset_images[1]),
            "--prompt", "What is in the image?", "--tokenizer-preset", "tiny", "--max-new-tokens", "8",
            "--device", "cpu", "--seed", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # --seed 0 builds the same random tokenizer as the session fixture (seed 0, then the preset).
    expected = expected_answer(root, sp, asset_images[1], "What is in the image?", tiny_tok, max_new_tokens=8)
    assert expected and result.output.strip() == expected


def test_generate_sampled_with_a_saved_tokenizer(workdir, asset_images, tiny_tok, tmp_path):
    root, sp = workdir
    tiny_tok.save_pretrained(tmp_path / "tok")
    # The text tokenizer defaults to the model folder's tokenizer.model.
    args = ["generate", "--model", str(root / "lm"), "--image", str(asset_images[2]), "--prompt", "Describe it.",
            "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9",
            "--seed", "5", "--attn-backend", "eager", "--template", "raw"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    expected = expected_answer(root, sp, asset_images[2], "Describe it.", tiny_tok, max_new_tokens=6,
                               temperature=0.8, top_p=0.9, seed=5, template="raw")
    assert result.output.strip() == expected


def test_generate_errors_are_one_line(workdir, asset_images, tmp_path):
    root, sp = workdir
    runner = CliRunner()
    result = runner.invoke(main, ["generate", "--model", str(root / "lm"), "--image", str(asset_images[0]),
                                  "--prompt", "hi"])
    assert result.exit_code == 1 and result.output == (
        f"Error: {root / 'lm'} does not name its image tokenizer (no image_tokenizer/ sub-folder, no tokenizer recorded "
        f"in config.json, no vqgan.ckpt); pass --tokenizer PATH (a libra-tok folder or the official vqgan.ckpt) "
        f"or --tokenizer-preset tiny\n")
    (tmp_path / "m").mkdir()
    result = runner.invoke(main, ["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"])
    assert result.exit_code == 1 and "pass --text-tokenizer" in result.output
    assert "Traceback" not in result.output


def test_help_documents_every_option():
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0
    command = main.commands["generate"]
    options = {p.opts[0]: p for p in command.params if isinstance(p, click.Option)}
    assert {"--model", "--image", "--prompt", "--tokenizer", "--tokenizer-preset", "--text-tokenizer", "--template",
            "--max-new-tokens", "--temperature", "--top-p", "--stop", "--seed", "--attn-backend", "--device",
            "--dtype", "--trust-pickle"} <= set(options)
    for name, option in options.items():
        assert option.help and len(option.help) > 15, f"{name} has no help text"
        assert name in result.output


# ---- the image tokenizer of the model folder, without --tokenizer ---------------------------------------
def official_libra_folder(folder, sp, monkeypatch, extra=None):
    """An official Libra LM folder (tiny): LM weights and config.json, tokenizer.model, and the
    image tokenizer's vqgan.ckpt + vision_tokenizer_config.yaml. Returns the image tokenizer."""
    from libra_tok import ImageTokenizer
    from test_checkpoint import official_layout, write_official_tokenizer_files
    from test_encoder import hf_tiny_clip
    from test_lm_checkpoint import write_official_folder

    write_official_folder(folder)
    (folder / "tokenizer.model").write_bytes(sp.read_bytes())
    torch.manual_seed(7)
    write_official_tokenizer_files(folder, official_layout(hf_tiny_clip(), ImageTokenizer("tiny")), monkeypatch)
    if extra is not None:  # more top-level entries in vqgan.ckpt
        ckpt = torch.load(folder / "vqgan.ckpt", weights_only=True)
        torch.save({**ckpt, **extra}, folder / "vqgan.ckpt")
    from libra_tok import load_official

    return load_official(folder, trust_pickle=True).eval()


def run_generate(model_dir, image, *extra):
    args = ["generate", "--model", str(model_dir), "--image", str(image), "--prompt", "What is in the image?",
            "--max-new-tokens", "6", "--device", "cpu", *extra]
    return CliRunner().invoke(main, args)


def test_generate_on_an_official_folder_without_tokenizer(workdir, asset_images, tmp_path, monkeypatch):
    root, sp = workdir
    folder = tmp_path / "libra-11b-chat"
    tok = official_libra_folder(folder, sp, monkeypatch)
    result = run_generate(folder, asset_images[3])
    assert result.exit_code == 0, result.output
    expected = expected_answer(root, sp, asset_images[3], "What is in the image?", tok, model_dir=folder,
                               max_new_tokens=6)
    assert expected and result.stdout.strip() == expected


class Opaque:  # an object a weights-only unpickler refuses
    pass


def test_generate_trust_pickle_for_an_official_tokenizer(workdir, asset_images, tmp_path, monkeypatch):
    root, sp = workdir
    folder = tmp_path / "libra-11b-chat"
    tok = official_libra_folder(folder, sp, monkeypatch, extra={"callbacks": Opaque()})
    refused = run_generate(folder, asset_images[3])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert refused.output.startswith(f"Error: {folder / 'vqgan.ckpt'} contains Python objects besides tensors")
    assert "(command line: --trust-pickle)" in refused.output
    trusted = run_generate(folder, asset_images[3], "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output
    expected = expected_answer(root, sp, asset_images[3], "What is in the image?", tok, model_dir=folder,
                               max_new_tokens=6)
    assert trusted.stdout.strip() == expected


def test_generate_on_our_folders_without_tokenizer(workdir, asset_images, tiny_tok, tmp_path):
    from libra_tok.pipeline import tokenizer_identity

    root, sp = workdir
    model = LibraForCausalLM.from_pretrained(root / "lm")
    source = tiny_tok.save_pretrained(tmp_path / "tok")
    recorded = model.save_pretrained(tmp_path / "recorded", image_tokenizer=tokenizer_identity(tiny_tok, str(source)))
    inside = model.save_pretrained(tmp_path / "inside")
    tiny_tok.save_pretrained(inside / "image_tokenizer")
    expected = expected_answer(root, sp, asset_images[4], "What is in the image?", tiny_tok, max_new_tokens=6)
    for folder in (recorded, inside):
        (folder / "tokenizer.model").write_bytes(sp.read_bytes())
        result = run_generate(folder, asset_images[4])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected


# ---- usage and one-line errors --------------------------------------------------------------------------
@pytest.mark.parametrize("option", [["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"],
                                    ["--top-p", "nan"], ["--top-p", "0"]])
def test_sampling_options_are_usage_errors(workdir, option):
    root, _ = workdir
    result = CliRunner().invoke(main, ["generate", "--model", str(root / "lm"), "--prompt", "hi", *option])
    assert result.exit_code == 2 and f"Invalid value for '{option[0]}'" in result.output


def test_broken_inputs_give_one_line_errors(workdir, asset_images, tmp_path):
    root, sp = workdir
    broken = tmp_path / "cat.jpg"
    broken.write_bytes(asset_images[0].read_bytes()[:200])
    result = run_generate(root / "lm", broken, "--tokenizer-preset", "tiny")
    assert result.exit_code == 1 and result.output.startswith(f"Error: cannot read --image {broken}: corrupt image")
    assert result.output.count("\n") == 1
    text = tmp_path / "notes.png"
    text.write_text("hello")
    result = run_generate(root / "lm", text, "--tokenizer-preset", "tiny")
    assert result.exit_code == 1 and result.output == f"Error: cannot read --image {text}: not an image\n"

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (root / "lm").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    result = run_generate(damaged, asset_images[0], "--tokenizer-preset", "tiny")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: cannot read {weights}: a damaged or truncated safetensors file")


def test_prompt_longer_than_the_context_is_an_error(workdir, asset_images, tmp_path):
    root, sp = workdir
    short = LibraForCausalLM.from_pretrained(root / "lm", max_position_embeddings=80).save_pretrained(tmp_path / "short")
    (short / "tokenizer.model").write_bytes(sp.read_bytes())
    result = run_generate(short, asset_images[0], "--tokenizer-preset", "tiny")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert re.fullmatch(r"Error: the prompt has \d+ tokens but the model's context is 80 \(max_position_embeddings\); "
                        r"shorten the prompt\n", result.output)
