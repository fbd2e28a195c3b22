"""The HoVLE model: its patch path against hand-written definitions, the reduction to a plain
LLaMA (transformers' LlamaForCausalLM), images placed in order, generation with both KV caches
against full recomputation, folders round trip."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from builders import TINY, hf_llama, randomize_
from libra_lm.hovle import HoVLEConfig, HoVLEForCausalLM
from libra_lm.hovle.embedding import PatchEmbedding, pixel_shuffle
from libra_lm.hovle.generate import chat, generate, image_placeholder, prompts_with_images
from libra_lm.segments import concat_segments, text_segment

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = HoVLEConfig.from_preset("hovle-tiny")


def model(seed=0, **overrides) -> HoVLEForCausalLM:
    torch.manual_seed(seed)
    return randomize_(HoVLEForCausalLM(CFG.replace(**overrides)), seed=seed, scale=0.2).eval()


def test_presets():
    assert CFG.tokens_per_image == CFG.num_image_tokens == 64 and CFG.hidden_size == TINY.hidden_size
    with torch.device("meta"):
        big = HoVLEForCausalLM("hovle-2.6b")
    assert big.config.num_embedding_layers == 8 and big.config.num_hidden_layers == 24
    assert 2.3e9 < sum(p.numel() for p in big.parameters()) < 2.7e9
    with pytest.raises(ValueError, match="the patch path yields 256 tokens per image"):
        HoVLEConfig(image_size=448)


def test_patch_embedding_is_unfold_and_linear():
    torch.manual_seed(0)
    embed = PatchEmbedding(CFG)
    torch.nn.init.normal_(embed.position_embedding)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    p, d, g = CFG.patch_size, CFG.hidden_size, CFG.patch_grid
    patches = F.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)  # (M, g*g, 3*p*p), row-major grid
    expected = patches @ embed.proj.weight.reshape(d, -1).T + embed.proj.bias + embed.position_embedding
    torch.testing.assert_close(embed(pixels).reshape(2, g * g, d), expected, rtol=1e-5, atol=1e-5)
    # Another image size: the position embedding is resized bicubically.
    small = torch.randn(1, 3, CFG.image_size // 2, CFG.image_size // 2)
    grid = embed.position_embedding.reshape(1, g, g, d).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(g // 2, g // 2), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    patches = F.unfold(small, kernel_size=p, stride=p).transpose(1, 2)
    expected = patches @ embed.proj.weight.reshape(d, -1).T + embed.proj.bias + pos
    torch.testing.assert_close(embed(small).reshape(1, -1, d), expected, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_is_its_definition():
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).view(2, 4, 4, 3)
    out = pixel_shuffle(x)
    assert out.shape == (2, 2, 2, 12)
    for m in range(2):
        for i in range(2):
            for j in range(2):
                block = [x[m, 2 * i, 2 * j], x[m, 2 * i, 2 * j + 1], x[m, 2 * i + 1, 2 * j], x[m, 2 * i + 1, 2 * j + 1]]
                assert torch.equal(out[m, i, j], torch.cat(block))
    assert out[0, 1, 0].tolist()[:6] == [24.0, 25.0, 26.0, 27.0, 28.0, 29.0]  # x[0, 2, 0], x[0, 2, 1]


def test_without_layers_it_is_the_plain_llama(tmp_path):
    """N = 0: the module is the (copied) token table, so on text HoVLE is transformers' LLaMA."""
    hf = hf_llama(seed=3)
    hf.save_pretrained(tmp_path / "llama")
    ours = HoVLEForCausalLM.from_llm(tmp_path / "llama", preset="hovle-tiny", num_embedding_layers=0).eval()
    ids = torch.randint(3, TINY.text_vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.embedding_model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_images_fill_their_positions_in_order():
    m = model()
    seg = concat_segments([text_segment([1, 5], CFG), image_placeholder(CFG), text_segment([13, 9], CFG),
                           image_placeholder(CFG), text_segment([7], CFG)], CFG)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = m(seg.ids[None], pixels, embeddings_only=True).embeddings
        b = m(seg.ids[None], pixels.flip(0), embeddings_only=True).embeddings
        tokens = m.embedding_model.image_tokens(pixels)
    assert not torch.allclose(a[0, 3:3 + 64], b[0, 3:3 + 64])
    torch.testing.assert_close(a[0, :3], b[0, :3])  # the prefix before the first image is causal and the same
    x = m.embedding_model.embed(seg.ids[None, :, 0], pixels)
    torch.testing.assert_close(x[0, 3:3 + 64], tokens[0])
    torch.testing.assert_close(x[0, 71:71 + 64], tokens[1])  # after text, EOI, 2 text ids, BOI
    with pytest.raises(ValueError, match="128 image patch positions, the pixel_values 1 images"):
        m(seg.ids[None], pixels[:1])


def test_generation_with_both_caches_equals_full_recompute(text_tok):
    m = model(seed=2)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), None, Image.new("RGB", (20, 50), (10, 90, 200))]
    questions = ["what colour is it?", "say hello", "and this one?"]
    ids, pixels, mask = prompts_with_images(m, text_tok, questions, images)
    assert pixels.shape == (2, 3, CFG.image_size, CFG.image_size) and mask[1, 0] == 0
    out = generate(m, ids, pixels, mask, max_new_tokens=6, eos_token_id=-1)
    # Step by step: the cached step's logits equal those of a forward over the whole sequence.
    cache_out = m(ids, pixels, mask, use_cache=True)
    cache, seq, full_mask = cache_out.past_key_values, ids, mask
    logits = cache_out.logits[:, -1]
    for step in range(6):
        with torch.no_grad():
            full = m(seq, pixels, full_mask).logits[:, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
        nxt = full.argmax(-1)
        assert torch.equal(out.sequences[:, step, 0], nxt)
        seq = torch.cat([seq, nxt[:, None, None].expand(-1, 1, 2)], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
        with torch.no_grad():
            logits = m.decode_step(nxt[:, None], cache).logits[:, -1]
    texts = chat(m, text_tok, questions, images, max_new_tokens=6, eos_token_id=-1).texts
    assert texts == [text_tok.decode(row[:, 0].tolist()) for row in out.sequences]


def test_gradient_checkpointing_changes_nothing():
    m = model(seed=4).train()
    ids = torch.randint(3, 300, (2, 9))
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = flag
        m(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_folder_round_trip_and_other_image_size(tmp_path):
    m = model(seed=5)
    m.save_pretrained(tmp_path / "m")
    back = HoVLEForCausalLM.from_pretrained(tmp_path / "m")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    bigger = HoVLEForCausalLM.from_pretrained(tmp_path / "m", image_size=96, num_image_tokens=144)
    assert bigger.embedding_model.patch_embed.position_embedding.shape == (1, 24 * 24, CFG.hidden_size)
    with pytest.raises(ValueError, match="is not a HoVLE folder"):
        from libra_lm import LibraForCausalLM

        LibraForCausalLM(TINY).save_pretrained(tmp_path / "libra")
        HoVLEForCausalLM.from_pretrained(tmp_path / "libra")
