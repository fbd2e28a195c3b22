"""`libra-lm generate` end to end, offline: image -> libra_tok ids -> LM -> text."""

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


def expected_answer(root, sp, image, prompt, tok, **kw):
    model = LibraForCausalLM.from_pretrained(root / "lm")
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
    assert result.exit_code == 1 and "Error: an --image needs an image tokenizer" in result.output
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
            "--dtype"} <= set(options)
    for name, option in options.items():
        assert option.help and len(option.help) > 15, f"{name} has no help text"
        assert name in result.output
