"""Text-to-image (paper §4.3, Fig. 3 b, c): the training layout and its labels, the t2i stage of
`libra-lm train`, the prompt of generation, the decoding loop (seeded, equal to `generate`'s
greedy draws), classifier-free guidance, and `libra-lm generate-image`, offline."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from builders import TINY, cli_error, randomize_
from libra_cli.lm import main
from libra_lm import LibraForCausalLM, TextTokenizer
from libra_lm.data import ShardImages, collate, preprocess_caption
from libra_lm.data.t2i import T2IDataset, t2i_example
from libra_lm.generate import collate_prompts, generate
from libra_lm.model import IGNORE_INDEX
from libra_lm.segments import Segment
from libra_lm.train import TrainConfig, Trainer
from libra_lm.visual import generate_images, sample_image_ids, t2i_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

P, V_T = TINY.num_image_tokens, TINY.text_vocab_size


def random_model(seed=0, backend="sdpa"):
    torch.manual_seed(seed)
    return randomize_(LibraForCausalLM(TINY, attn_backend=backend), seed=seed, scale=0.3).eval()


def random_ids(seed=0):
    return torch.randint(0, TINY.codebook_size, (P, 2), generator=torch.Generator().manual_seed(seed))


# ---- the training layout ----------------------------------------------------------------------------------
def test_t2i_example_is_caption_then_image_with_labels_on_image_tokens_only(text_tok):
    ids = random_ids()
    example = t2i_example(ids, "a red apple on a table", text_tok, TINY)
    caption = text_tok.encode("a red apple on a table", bos=True)
    n = len(caption)
    col = example.ids[:, 0].tolist()
    assert col[:n] == caption and col[n] == TINY.newline_token_id and col[n + 1] == TINY.boi_token_id
    assert torch.equal(example.ids[n + 2:n + 2 + P], ids + V_T) and col[n + 2 + P:] == [TINY.eoi_token_id]
    trained = (example.labels != IGNORE_INDEX).all(-1)
    expected = torch.zeros(len(example), dtype=torch.bool)
    expected[n + 2:] = True  # the patches and EOI, nothing else
    assert torch.equal(trained, expected) and not (example.labels != IGNORE_INDEX)[~trained].any()
    assert torch.equal(example.labels[trained], example.ids[trained])
    assert example.num_labels == P + 1
    assert [(s.start, s.features, s.pixels) for s in example.images] == [(n + 2, None, None)]  # no CLIP features


def test_a_long_caption_is_cut_never_the_image(text_tok):
    ids = random_ids(1)
    full = t2i_example(ids, "a red apple on a table", text_tok, TINY)
    cut = t2i_example(ids, "a red apple on a table", text_tok, TINY, max_length=P + 6)
    assert len(cut) == P + 6 and torch.equal(cut.ids[:2], full.ids[:2])
    assert torch.equal(cut.ids[-(P + 3):], full.ids[-(P + 3):])  # "\n", BOI, patches, EOI
    assert cut.num_labels == P + 1
    with pytest.raises(ValueError, match=r"max_length 67 cannot hold a text-to-image sequence \(BOS, the newline "
                                         r"and 66 image tokens, before any caption\); raise --max-length"):
        t2i_example(ids, "a red apple", text_tok, TINY, max_length=P + 3)


def test_t2i_dataset_reads_captioned_shards(shard_dirs, sp):
    images = ShardImages([shard_dirs[1]], "discrete")
    data = T2IDataset(images, sp, TINY)
    assert len(data) == len(images) - 1 and list(data.skipped.values()) == ["no caption"]
    text_tok = TextTokenizer(sp)
    for position in (0, len(data) - 1):
        index = int(data.indices[position])
        example = data[(position, 0)]
        caption = preprocess_caption(images.meta(index)["caption"])
        assert torch.equal(example.ids, t2i_example(images.ids(index), caption, text_tok, TINY).ids)
    batch = collate([data[0], data[1]], TINY)
    assert batch.clip_features is None and batch.pixels is None  # the contiguous signal stays zero
    assert batch.num_labels == 2 * (P + 1)


def test_t2i_stage_defaults():
    cfg = TrainConfig(stage="t2i")
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.max_length, cfg.steps, cfg.frozen_llm) == \
        (1e-4, 8, 4, 700, None, True)


def test_t2i_stage_trains_the_image_tokens_and_its_loss_falls(tmp_path, shard_dirs, sp):
    cfg = TrainConfig(stage="t2i", data=[str(shard_dirs[1])], preset="tiny", text_tokenizer=str(sp),
                      out_dir=str(tmp_path / "run"), steps=24, batch_size=8, grad_accum=1, lr=4e-3, num_workers=0,
                      log_every=1, save_every=100, val_every=100, gradient_checkpointing=False, seed=0, device="cpu")
    trainer = Trainer(cfg, progress=False)
    assert trainer.image_tok is None  # shards without stored features: none are computed either
    assert all("vision" in n for n, _ in trainer.model.named_trainable_parameters())
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
    assert all("loss_text" not in r and r["loss"] == pytest.approx(r["loss_image"]) for r in rows if "loss" in r)
    assert all(r["labels"] == 8 * (P + 1) for r in rows if "loss" in r)  # patches + EOI of 8 pairs per step


# ---- the prompt and the decoding loop ----------------------------------------------------------------------
def test_the_prompt_is_the_start_of_a_training_sequence(text_tok):
    prompt = t2i_prompt(text_tok, TINY, "A Red  Apple ~ on a table")
    example = t2i_example(random_ids(), preprocess_caption("A Red  Apple ~ on a table"), text_tok, TINY)
    n = prompt.ids.shape[0]
    assert torch.equal(prompt.ids, example.ids[:n]) and prompt.ids[-1, 0] == TINY.boi_token_id
    empty = t2i_prompt(text_tok, TINY, "")
    assert empty.ids[:, 0].tolist() == [TINY.bos_token_id, TINY.newline_token_id, TINY.boi_token_id]


def test_generation_is_reproducible_and_differs_across_seeds(text_tok):
    model = random_model()

    def draw(seed, **kw):
        return generate_images(model, text_tok, "a red apple", samples=3, generator=torch.Generator().manual_seed(seed),
                               **kw)

    first = draw(0)
    assert first.shape == (3, P, 2) and int(first.min()) >= 0 and int(first.max()) < TINY.codebook_size
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    assert len({tuple(x.flatten().tolist()) for x in first}) == 3  # the samples of a batch differ
    assert torch.equal(draw(2, top_k=5, top_p=0.9, temperature=0.7), draw(2, top_k=5, top_p=0.9, temperature=0.7))
    assert not torch.equal(draw(2, top_k=5), draw(2, top_k=5, temperature=0.5))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_draws_equal_generate(text_tok, backend):
    """Without guidance the loop draws what libra_lm.generate draws inside an image."""
    model = random_model(seed=1, backend=backend)
    prompts = [t2i_prompt(text_tok, TINY, "a red apple"), t2i_prompt(text_tok, TINY, "two dogs in a park")]
    ours = sample_image_ids(model, prompts, P, temperature=0)
    out = generate(model, *collate_prompts(prompts, TINY), max_new_tokens=P, temperature=0)
    assert torch.equal(ours, out.sequences[:, :P] - V_T)


def test_cfg_scale_one_equals_no_cfg(text_tok):
    model = random_model(seed=2)
    kw = dict(samples=3, temperature=1.0, top_k=100)
    plain = generate_images(model, text_tok, "a red apple", generator=torch.Generator().manual_seed(3), **kw)
    guided = generate_images(model, text_tok, "a red apple", cfg_scale=1.0, generator=torch.Generator().manual_seed(3),
                             **kw)
    assert torch.equal(plain, guided)
    strong = generate_images(model, text_tok, "a red apple", cfg_scale=4.0, generator=torch.Generator().manual_seed(3),
                             **kw)
    assert not torch.equal(plain, strong)


def test_guided_greedy_draws_equal_the_uncached_reference(text_tok):
    """Guidance written from its definition: both prompts through the whole model at every
    step, argmax of uncond + s * (cond - uncond), the drawn ids appended to both."""
    model, scale = random_model(seed=3), 3.0
    cond = t2i_prompt(text_tok, TINY, "a red apple").ids[None]
    uncond = t2i_prompt(text_tok, TINY, "").ids[None]
    expected = []
    for _ in range(12):
        with torch.no_grad():
            c = model(cond).vision_logits[0, -1, :, : TINY.codebook_size]
            u = model(uncond).vision_logits[0, -1, :, : TINY.codebook_size]
        nxt = (u + scale * (c - u)).argmax(-1)
        expected.append(nxt)
        cond = torch.cat([cond, (nxt + V_T)[None, None]], 1)
        uncond = torch.cat([uncond, (nxt + V_T)[None, None]], 1)
    ours = generate_images(model, text_tok, "a red apple", samples=2, cfg_scale=scale, temperature=0)
    assert torch.equal(ours[0, :12], torch.stack(expected)) and torch.equal(ours[1], ours[0])
    assert not torch.equal(ours, generate_images(model, text_tok, "a red apple", samples=2, temperature=0))


def test_sampling_options_are_checked(text_tok):
    model = random_model()
    prompt = t2i_prompt(text_tok, TINY, "a cat")
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        generate_images(model, text_tok, "a cat", cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="top_p must be in"):
        generate_images(model, text_tok, "a cat", top_p=0.0)
    with pytest.raises(ValueError, match="classifier-free guidance needs one unconditional prompt per prompt"):
        sample_image_ids(model, [prompt], 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="an image prompt must end inside an image"):
        sample_image_ids(model, [Segment(prompt.ids[:-1])], 4)
    with pytest.raises(ValueError, match="num_new must be >= 0 and fit the image: 64 patches"):
        sample_image_ids(model, [prompt], P + 1)
    small_context = LibraForCausalLM(TINY.replace(max_position_embeddings=P + 4)).eval()
    with pytest.raises(ValueError, match=r"do not fit the model's context of 68 tokens"):
        sample_image_ids(small_context, [prompt], P)


# ---- train --stage t2i, then generate-image, on the command line ---------------------------------------------
def test_train_t2i_then_generate_image(tmp_path, shard_dirs, sp):
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--stage", "t2i", str(shard_dirs[1]), "--text-tokenizer", str(sp),
                               "--out-dir", str(tmp_path / "t2i"), "--steps", "2", "--batch-size", "4",
                               "--grad-accum", "1", "--num-workers", "0", "--no-gradient-checkpointing",
                               "--device", "cpu", "--lr", "0.003"])
    assert res.exit_code == 0, res.output
    final = tmp_path / "t2i" / "final"
    out = tmp_path / "images"
    # The image tokenizer is the one the shards were encoded with, recorded by training.
    res = runner.invoke(main, ["generate-image", "--model", str(final), "--prompt", "A cat on a sofa", "--samples",
                               "2", "--out", str(out), "--device", "cpu", "--seed", "4", "--cfg-scale", "2"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'grid.png'} (2 image(s))" in res.output
    model = LibraForCausalLM.from_pretrained(final)
    expected = generate_images(model, TextTokenizer(final / "tokenizer.model"), "A cat on a sofa", samples=2,
                               cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    saved = load_file(out / "ids.safetensors")
    assert torch.equal(saved["images"], expected)
    assert (out / "prompt.txt").read_text() == "A cat on a sofa\n"
    with Image.open(out / "grid.png") as grid, Image.open(out / "image_1.png") as one:
        side = one.size[0]
        assert grid.size == (2 * side + 3 * 4, side + 2 * 4)


def test_generate_image_errors_are_one_line(tmp_path, sp):
    root = tmp_path / "lm"
    random_model().save_pretrained(root)
    base = ["generate-image", "--model", str(root), "--prompt", "x", "--device", "cpu"]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "o")])
    assert cli_error(res) == f"Error: {root} has no tokenizer.model; pass --text-tokenizer PATH"
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "o"), "--text-tokenizer", str(sp)])
    assert cli_error(res).startswith(f"Error: {root} does not name its image tokenizer")
    (tmp_path / "file").write_text("")
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "file" / "o"), "--text-tokenizer", str(sp)])
    assert cli_error(res) == (f"Error: --out {tmp_path / 'file' / 'o'} lies under {tmp_path / 'file'}, which is a "
                              "file, not a folder; choose another --out")
    assert not (tmp_path / "o").exists()
