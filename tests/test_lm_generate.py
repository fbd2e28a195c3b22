"""KV-cache decoding, generation rules, prompts through libra_tok, sampling."""

import pytest
import torch

from libra_lm import KVCache, LibraForCausalLM, TextTokenizer
from libra_lm.generate import (
    VICUNA_V1_SYSTEM,
    Segment,
    build_prompt,
    chat,
    collate,
    encode_images,
    generate,
    image_segment,
    sample_logits,
)
from test_lm_model import TINY, mixed_batch, randomize_
from test_lm_text import train_tiny_text_tokenizer

SMALL_IMAGES = TINY.replace(num_image_tokens=4)  # short images keep generation tests fast


@pytest.fixture(scope="module")
def text_tok(tmp_path_factory):
    return TextTokenizer.from_pretrained(train_tiny_text_tokenizer(tmp_path_factory.mktemp("sp")))


def random_model(config=TINY, seed=0, backend="sdpa"):
    torch.manual_seed(seed)
    return randomize_(LibraForCausalLM(config, attn_backend=backend), seed=seed, scale=0.3).eval()


# ---- KV cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(backend):
    model = random_model(backend=backend)
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 4), ("t", 3), ("i", 2), ("t", 3)],
                                    [("t", 2), ("i", 7), ("t", 8)]], seed=1)
    n = ids.shape[1]
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :2] = 0  # row 1 starts with two padding tokens
    with torch.no_grad():
        full = model(ids, feats, mask)
        cache = KVCache(TINY.num_hidden_layers)
        # Prefill inside the first image, then a chunk of 3, then one token at a time.
        steps = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, n)]
        for start, end in steps:
            out = model(ids[:, start:end], feats[:, start:end], mask[:, :end], past_key_values=cache)
            assert cache.length == end
            torch.testing.assert_close(out.text_logits, full.text_logits[:, start:end], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.vision_logits, full.vision_logits[:, start:end], rtol=1e-4, atol=1e-4)


def test_cache_grows_past_its_capacity():
    model = random_model()
    ids, feats = mixed_batch(TINY, [[("t", 4), ("i", 3), ("t", 4)]], seed=2)
    with torch.no_grad():
        full = model(ids, feats).text_logits
        cache = KVCache(TINY.num_hidden_layers, capacity=2)
        outs = [model(ids[:, t:t + 1], feats[:, t:t + 1], past_key_values=cache).text_logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


# ---- generation rules ----------------------------------------------------------------------------------
def reference_greedy(model, ids, feats, steps):
    """Uncached greedy decoding written from the rules: text argmax in both columns, codes
    argmax per codebook inside an image, EOI after the last patch, newline after EOI."""
    cfg = model.config
    ids, feats = ids.clone(), feats.clone()
    out_tokens = []
    for _ in range(steps):
        with torch.no_grad():
            out = model(ids, feats)
        last = ids[0, -1, 0].item()
        col = ids[0, :, 0].tolist()
        boi = max((i for i, t in enumerate(col) if t == cfg.boi_token_id), default=-1)
        eoi = max((i for i, t in enumerate(col) if t == cfg.eoi_token_id), default=-1)
        if last == cfg.eoi_token_id:
            nxt = [cfg.newline_token_id] * 2
        elif boi > eoi:
            if len(col) - 1 - boi == cfg.num_image_tokens:
                nxt = [cfg.eoi_token_id] * 2
            else:
                nxt = [int(out.vision_logits[0, -1, c, : cfg.codebook_size].argmax()) + cfg.text_vocab_size for c in range(2)]
        else:
            nxt = [int(out.text_logits[0, -1].argmax())] * 2
        out_tokens.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        feats = torch.cat([feats, torch.zeros(1, 1, feats.shape[2])], 1)
    return torch.tensor(out_tokens)


def prompt_rows(cfg):
    """Three prompts: ends with text; ends with BOI (asks for an image); ends with EOI."""
    a_ids, a_feats = mixed_batch(cfg, [[("t", 3), ("i", 4), ("t", 2)]], seed=5)
    b_ids, b_feats = mixed_batch(cfg, [[("t", 2)]], seed=6)
    b_ids = torch.cat([b_ids, torch.full((1, 1, 2), cfg.boi_token_id)], 1)
    b_feats = torch.cat([b_feats, torch.zeros(1, 1, cfg.contiguous_signal_size)], 1)
    c_ids, c_feats = mixed_batch(cfg, [[("t", 1), ("i", 4)]], seed=7)
    return [(a_ids, a_feats), (b_ids, b_feats), (c_ids, c_feats)]


def test_greedy_generation_equals_uncached_reference_in_a_padded_batch():
    cfg = SMALL_IMAGES
    model = random_model(cfg, seed=3)
    rows = prompt_rows(cfg)
    prompts = [Segment(i[0], f[0]) for i, f in rows]
    ids, feats, mask = collate(prompts, cfg)
    assert mask[1].tolist()[:6] == [0] * 6  # left padding
    steps = 9
    out = generate(model, ids, feats, mask, max_new_tokens=steps, eos_token_id=-1)
    assert out.sequences.shape == (3, steps, 2) and out.stop_reasons == ["length"] * 3
    for r, (i, f) in enumerate(rows):
        assert torch.equal(out.sequences[r], reference_greedy(model, i, f, steps)), r
    # The image request: 4 codes, forced EOI, forced newline, then text.
    seq = out.sequences[1]
    assert (seq[:4] >= cfg.text_vocab_size).all() and (seq[:4] < cfg.boi_token_id).all()
    assert seq[4].tolist() == [cfg.eoi_token_id] * 2 and seq[5].tolist() == [13, 13]
    assert len(out.images[1]) == 1 and torch.equal(out.images[1][0], seq[:4] - cfg.text_vocab_size)
    # A prompt ending with EOI continues with a newline.
    assert out.sequences[2, 0].tolist() == [13, 13]


def test_sampling_is_seeded_and_consistent_across_columns():
    model = random_model(seed=4)
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 2), ("t", 2)]] * 2, seed=8)

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, feats, max_new_tokens=12, eos_token_id=-1, temperature=1.5, generator=g, **kw).sequences

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(first[..., 0], first[..., 1])  # one token per text position
    greedy = generate(model, ids, feats, max_new_tokens=12, eos_token_id=-1).sequences
    assert torch.equal(run(2, top_k=1), greedy) and torch.equal(run(3, top_p=1e-6), greedy)


def test_sample_logits_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(400, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}
    draws = sample_logits(logits, temperature=1.0, top_p=0.9, generator=g)
    assert set(draws.tolist()) == {0, 1, 2}
    assert sample_logits(logits[:1], temperature=0).tolist() == [0]


def test_eos_and_stop_strings(text_tok):
    model = random_model(seed=5)
    prompt = build_prompt(text_tok, TINY, "What is in the image?", template="raw")
    ids, _, mask = collate([prompt], TINY)
    free = generate(model, ids, None, mask, max_new_tokens=10, eos_token_id=-1, text_tokenizer=text_tok)
    tokens = free.sequences[0, :, 0].tolist()
    eos = tokens[3]
    first = tokens.index(eos)
    stopped = generate(model, ids, None, mask, max_new_tokens=10, eos_token_id=eos, text_tokenizer=text_tok)
    assert stopped.stop_reasons == ["eos"] and stopped.lengths == [first]
    assert torch.equal(stopped.sequences[0, :first], free.sequences[0, :first])
    assert (stopped.sequences[0, first + 1:] == TINY.pad_token_id).all()

    text = free.texts[0]
    assert text == text_tok.decode(tokens)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = generate(model, ids, None, mask, max_new_tokens=10, eos_token_id=-1, stop_strings=[stop], text_tokenizer=text_tok)
    assert out.stop_reasons == ["stop_string"] and out.texts[0] == text[: text.index(stop)]
    with pytest.raises(ValueError, match="stop_strings need a text_tokenizer"):
        generate(model, ids, None, mask, stop_strings=["x"])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, None, torch.cat([mask[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1))


# ---- prompts with images through libra_tok ----------------------------------------------------------------
def test_vicuna_prompt_layout_with_an_image(text_tok, tiny_tok, asset_images):
    image = encode_images(tiny_tok, [asset_images[0]], TINY)[0]
    enc = tiny_tok.encode(tiny_tok.preprocess([asset_images[0]]))
    prompt = build_prompt(text_tok, TINY, "What is this?", image)
    head = text_tok.encode(f"{VICUNA_V1_SYSTEM} USER:", bos=True)
    tail = text_tok.encode("\nWhat is this? ASSISTANT:", prefix_space=False)
    expected = head + [TINY.boi_token_id] + [-1] * 64 + [TINY.eoi_token_id] + tail
    ids = prompt.ids
    assert ids.shape == (len(expected), 2)
    assert ids[:, 0].tolist()[: len(head)] == head and ids[len(head) + 66:, 0].tolist() == tail
    assert ids[len(head) + 66, 0] == 13  # EOI is followed by the newline byte
    patches = ids[len(head) + 1: len(head) + 65]
    assert torch.equal(patches, enc.ids[0] + TINY.text_vocab_size)
    assert ids[len(head), 0] == TINY.boi_token_id and ids[len(head) + 65, 0] == TINY.eoi_token_id
    feats = prompt.features
    torch.testing.assert_close(feats[len(head) + 1: len(head) + 65], enc.features[0])
    assert not feats[: len(head) + 1].any() and not feats[len(head) + 65:].any()
    assert text_tok.decode(ids[:, 0].tolist()) == f"{VICUNA_V1_SYSTEM} USER:\nWhat is this? ASSISTANT:"


def test_chat_batch_with_and_without_images_equals_single_runs(text_tok, tiny_tok, asset_images):
    model = random_model(seed=6)
    images = encode_images(tiny_tok, asset_images[:1], TINY)
    questions = ["Describe the picture.", "How many people are there?"]
    batch = chat(model, text_tok, questions, [images[0], None], max_new_tokens=6, eos_token_id=-1)
    for i, (q, img) in enumerate(zip(questions, [images[0], None])):
        single = chat(model, text_tok, [q], [img], max_new_tokens=6, eos_token_id=-1)
        assert torch.equal(batch.sequences[i], single.sequences[0])
        assert batch.texts[i] == single.texts[0]


def test_prompt_checks(text_tok, tiny_tok):
    with pytest.raises(ValueError, match=r"image codes must be \(num_image_tokens, num_codebooks\) = \(576, 2\)"):
        image_segment(torch.zeros(64, 2, dtype=torch.long), None, TINY.replace(num_image_tokens=576))
    with pytest.raises(ValueError, match="template must be one of"):
        build_prompt(text_tok, TINY, "hi", template="llama3")
    with pytest.raises(ValueError, match="text tokenizer has .* pieces but the LM's text vocabulary is 300"):
        build_prompt(text_tok, TINY.replace(text_vocab_size=300), "hi")


# ---- sampling options and the model's context ----------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    ({"temperature": float("inf")}, r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
    ({"top_p": 0.0, "temperature": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_k": -1}, r"top_k must be >= 0 \(0 = no limit\), got -1"),
])
def test_sampling_options_are_validated(options, message):
    model = random_model(seed=7)
    ids, feats = mixed_batch(TINY, [[("t", 3)]], seed=9)
    with pytest.raises(ValueError, match=message):
        generate(model, ids, feats, max_new_tokens=2, **options)
    with pytest.raises(ValueError, match=message):
        sample_logits(torch.zeros(2, 5), **options)


def test_prompt_longer_than_the_context_is_refused():
    cfg = TINY.replace(max_position_embeddings=12)
    model = random_model(cfg, seed=8)
    ids, feats = mixed_batch(cfg, [[("t", 13)]], seed=10)
    with pytest.raises(ValueError, match=r"the prompt has 13 tokens but the model's context is 12 "
                                         r"\(max_position_embeddings\)"):
        generate(model, ids, feats, max_new_tokens=1)
    # Left padding does not count: 12 real tokens fit.
    mask = torch.ones(1, 13, dtype=torch.long)
    mask[0, 0] = 0
    assert generate(model, ids, feats, mask, max_new_tokens=0).stop_reasons == ["length"]


def test_generation_stops_at_the_end_of_the_context(caplog):
    cfg = TINY.replace(max_position_embeddings=12)
    model = random_model(cfg, seed=8)
    long, _ = mixed_batch(cfg, [[("t", 9)]], seed=11)
    short, _ = mixed_batch(cfg, [[("t", 7)]], seed=12)
    ids, _, mask = collate([Segment(long[0]), Segment(short[0])], cfg)
    with caplog.at_level("WARNING", logger="libra_lm.generate"):
        out = generate(model, ids, None, mask, max_new_tokens=10, eos_token_id=-1)
    # The longest prompt (9 tokens) leaves room for 3 tokens in a context of 12.
    assert out.sequences.shape == (2, 3, 2) and out.lengths == [3, 3] and out.stop_reasons == ["length", "length"]
    assert "max_new_tokens 10 does not fit the model's context of 12 tokens after a prompt of 9: generating 3" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="libra_lm.generate"):
        exact = generate(model, ids, None, mask, max_new_tokens=3, eos_token_id=-1)
    assert torch.equal(exact.sequences, out.sequences) and not caplog.text
