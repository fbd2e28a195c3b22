"""Image completion (paper §4.3, Fig. 3 a): the kept rows stay exactly, the rest is drawn by the
vision heads in range, the prompt is the start of a pretraining sequence, and `libra-lm
complete-image` writes the grid and the ids, offline with the tiny presets."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from builders import TINY, cli_error, randomize_, train_tiny_text_tokenizer
from libra_cli.lm import main
from libra_lm import LibraForCausalLM
from libra_lm.data import pretrain_example
from libra_lm.visual import complete_image, completion_prompt, grid_side

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = grid_side(TINY)  # 8 x 8 patches in the tiny preset


def random_model(seed=0, backend="sdpa"):
    torch.manual_seed(seed)
    return randomize_(LibraForCausalLM(TINY, attn_backend=backend), seed=seed, scale=0.3).eval()


def random_ids(seed=0):
    return torch.randint(0, TINY.codebook_size, (TINY.num_image_tokens, TINY.num_codebooks),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("keep_rows", [0, 3, 7])
def test_completion_keeps_the_first_rows_and_draws_the_rest_in_range(keep_rows):
    model, ids = random_model(), random_ids()
    out = complete_image(model, ids, keep_rows, samples=3, generator=torch.Generator().manual_seed(1))
    kept = keep_rows * GRID
    assert out.shape == (3, TINY.num_image_tokens, 2) and out.dtype == torch.long
    assert torch.equal(out[:, :kept], ids[:kept].expand(3, -1, -1))
    new = out[:, kept:]
    assert new.shape[1] == TINY.num_image_tokens - GRID * keep_rows
    assert int(new.min()) >= 0 and int(new.max()) < TINY.codebook_size  # image ids only, never BOI/EOI
    assert len({tuple(row.flatten().tolist()) for row in new}) == 3  # three different draws


def reference_greedy(model, prompt_ids, steps):
    """Uncached greedy continuation written from the rules: the full sequence through the model
    at every step (no CLIP features), argmax of each vision head over the image ids."""
    seq = prompt_ids[None].clone()
    drawn = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(seq).vision_logits[0, -1, :, : TINY.codebook_size]
        nxt = logits.argmax(-1)
        drawn.append(nxt)
        seq = torch.cat([seq, (nxt + TINY.text_vocab_size)[None, None]], 1)
    return torch.stack(drawn)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_completion_equals_the_uncached_reference(backend):
    model, ids = random_model(seed=2, backend=backend), random_ids(seed=3)
    out = complete_image(model, ids, 5, samples=2, temperature=0)
    prompt = completion_prompt(ids, 5, TINY).ids
    expected = reference_greedy(model, prompt, TINY.num_image_tokens - 5 * GRID)
    assert torch.equal(out[0, 5 * GRID:], expected) and torch.equal(out[1], out[0])


def test_the_prompt_is_the_start_of_a_pretraining_sequence(tmp_path):
    from libra_lm import TextTokenizer

    ids = random_ids(seed=4)
    prompt = completion_prompt(ids, 2, TINY)
    expected = [[TINY.bos_token_id] * 2, [TINY.boi_token_id] * 2, *(ids[:2 * GRID] + TINY.text_vocab_size).tolist()]
    assert prompt.ids.tolist() == expected and prompt.features is None
    text_tok = TextTokenizer(train_tiny_text_tokenizer(tmp_path))
    example = pretrain_example(ids, "a cat on a sofa", text_tok, TINY)
    assert torch.equal(example.ids[: prompt.ids.shape[0]], prompt.ids)


def test_keep_rows_out_of_range_is_refused():
    model, ids = random_model(), random_ids()
    with pytest.raises(ValueError, match=r"keep_rows must be in \[0, 7\] for a 8 x 8 grid"):
        complete_image(model, ids, GRID)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        complete_image(model, ids, 1, samples=0)
    with pytest.raises(ValueError, match=r"image ids must be \(num_image_tokens, num_codebooks\) = \(64, 2\)"):
        complete_image(model, ids[:10], 1)


# ---- `libra-lm complete-image`, offline -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("completion")
    random_model(seed=5).save_pretrained(root / "lm")
    return root / "lm"


def test_complete_image_command_writes_the_grid_and_the_ids(model_dir, asset_images, tmp_path):
    from libra_tok.pipeline import load_tokenizer

    out = tmp_path / "out"
    args = ["complete-image", "--model", str(model_dir), "--image", str(asset_images[3]), "--keep-rows", "3",
            "--samples", "2", "--out", str(out), "--tokenizer-preset", "tiny", "--device", "cpu", "--seed", "7",
            "--top-k", "50"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'grid.png'}" in result.output
    saved = load_file(out / "ids.safetensors")
    tok = load_tokenizer(preset="tiny", device="cpu")
    original = tok.encode(tok.preprocess([asset_images[3]])).ids[0]
    assert torch.equal(saved["original"], original)
    model = LibraForCausalLM.from_pretrained(model_dir)
    expected = complete_image(model, original, 3, samples=2, top_k=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(saved["completions"], expected)  # the seed reproduces the command's draws
    side = tok.config.resolution
    with Image.open(out / "grid.png") as grid:  # input | kept part | 2 completions, 4 px apart
        assert grid.size == (4 * side + 5 * 4, side + 2 * 4)
        kept = grid.crop((2 * 4 + side, 4, 2 * 4 + 2 * side, 4 + side))
        assert kept.getpixel((side // 2, side - 2)) == (128, 128, 128)  # rows not kept are grey
    for i in range(2):
        with Image.open(out / f"completion_{i}.png") as picture:
            assert picture.size == (side, side)


def test_complete_image_errors_are_one_line(model_dir, asset_images, tmp_path):
    base = ["complete-image", "--model", str(model_dir), "--image", str(asset_images[0]), "--out", str(tmp_path),
            "--tokenizer-preset", "tiny", "--device", "cpu"]
    error = cli_error(CliRunner().invoke(main, [*base, "--keep-rows", "8"]))
    assert error == "Error: keep_rows must be in [0, 7] for a 8 x 8 grid (0 = draw the whole image), got 8"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    args = [*base, "--keep-rows", "1"]
    args[args.index(str(asset_images[0]))] = str(tmp_path / "broken.png")
    assert cli_error(CliRunner().invoke(main, args)).startswith(f"Error: cannot read --image {tmp_path / 'broken.png'}")
