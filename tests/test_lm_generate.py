"""KV-cache decoding, generation rules, prompts through libra_tok, sampling, and `libra-lm generate`
end to end, offline: image -> libra_tok ids -> LM -> text."""

import re

import click
import pytest
import torch
from click.testing import CliRunner

from builders import (
    TINY,
    Opaque,
    hf_tiny_clip,
    mixed_batch,
    official_layout,
    randomize_,
    train_tiny_text_tokenizer,
    write_official_folder,
    write_official_tokenizer_files,
)
from libra_cli.lm import main
from libra_lm import KVCache, LibraForCausalLM, TextTokenizer
from libra_lm.generate import build_prompt, chat, collate_prompts, generate, image_segments, sample_logits
from libra_lm.segments import Segment, image_segment
from libra_lm.templates import VICUNA_V1_SYSTEM

SMALL_IMAGES = TINY.replace(num_image_tokens=4)  # short images keep generation tests fast


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
        outs = [model(ids[:, t:t + 1], feats[:, t:t + 1], past_key_values=cache).text_logits
                for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)


# ---- generation rules ----------------------------------------------------------------------------------
def reference_greedy(model, ids, feats, steps):
    """Uncached greedy decoding written from the rules: text argmax in both columns, ids
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
                nxt = [int(out.vision_logits[0, -1, c, : cfg.codebook_size].argmax()) + cfg.text_vocab_size
                       for c in range(2)]
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
    ids, feats, mask = collate_prompts(prompts, cfg)
    assert mask[1].tolist()[:6] == [0] * 6  # left padding
    steps = 9
    out = generate(model, ids, feats, mask, max_new_tokens=steps, eos_token_id=-1)
    assert out.sequences.shape == (3, steps, 2) and out.stop_reasons == ["length"] * 3
    for r, (i, f) in enumerate(rows):
        assert torch.equal(out.sequences[r], reference_greedy(model, i, f, steps)), r
    # The image request: 4 image ids, forced EOI, forced newline, then text.
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
        return generate(model, ids, feats, max_new_tokens=12, eos_token_id=-1, temperature=1.5, generator=g,
                        **kw).sequences

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
    ids, _, mask = collate_prompts([prompt], TINY)
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
    out = generate(model, ids, None, mask, max_new_tokens=10, eos_token_id=-1, stop_strings=[stop],
                   text_tokenizer=text_tok)
    assert out.stop_reasons == ["stop_string"] and out.texts[0] == text[: text.index(stop)]
    with pytest.raises(ValueError, match="stop_strings need a text_tokenizer"):
        generate(model, ids, None, mask, stop_strings=["x"])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, None, torch.cat([mask[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1))


# ---- prompts with images through libra_tok ----------------------------------------------------------------
def test_vicuna_prompt_layout_with_an_image(text_tok, tiny_tok, asset_images):
    image = image_segments(tiny_tok, [asset_images[0]], TINY)[0]
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
    images = image_segments(tiny_tok, asset_images[:1], TINY)
    questions = ["Describe the picture.", "How many people are there?"]
    batch = chat(model, text_tok, questions, [images[0], None], max_new_tokens=6, eos_token_id=-1)
    for i, (q, img) in enumerate(zip(questions, [images[0], None], strict=True)):
        single = chat(model, text_tok, [q], [img], max_new_tokens=6, eos_token_id=-1)
        assert torch.equal(batch.sequences[i], single.sequences[0])
        assert batch.texts[i] == single.texts[0]


def test_prompt_checks(text_tok, tiny_tok):
    with pytest.raises(ValueError, match=r"image ids must be \(num_image_tokens, num_codebooks\) = \(576, 2\)"):
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
    ids, _, mask = collate_prompts([Segment(long[0]), Segment(short[0])], cfg)
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


# ---- validation and host synchronisation out of the decoding loop ------------------------------------
def test_decode_step_equals_the_full_forward():
    """The hot path (no checks, modality count from the host) gives the cached forward's logits,
    with left padding carried by the cache."""
    model = random_model(seed=9)
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 4), ("t", 3)], [("t", 2), ("i", 7), ("t", 1)]], seed=13)
    prefill = 6
    feats[:, prefill:] = 0  # decoding steps bring no CLIP features
    mask = torch.ones(2, ids.shape[1], dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        full = model(ids, feats, mask)
        cache = KVCache(TINY.num_hidden_layers)
        model(ids[:, :prefill], feats[:, :prefill], mask[:, :prefill], past_key_values=cache)
        assert cache.has_padding
        for t in range(prefill, ids.shape[1]):
            step = ids[:, t:t + 1]
            out = model.decode_step(step, cache, num_vision=int((step[..., 0] >= TINY.text_vocab_size).sum()))
            torch.testing.assert_close(out.text_logits, full.text_logits[:, t:t + 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.vision_logits, full.vision_logits[:, t:t + 1], rtol=1e-4, atol=1e-4)


def test_inputs_are_checked_once_per_generation(monkeypatch):
    model = random_model(seed=10)
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 2), ("t", 2)]] * 2, seed=14)
    calls = []
    check = LibraForCausalLM.check_input_ids
    monkeypatch.setattr(LibraForCausalLM, "check_input_ids", lambda self, x: calls.append(1) or check(self, x))
    generate(model, ids, feats, max_new_tokens=7, eos_token_id=-1)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="same text id in every codebook"):
        generate(model, torch.tensor([[[5, 6]]]), max_new_tokens=3)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_one_read_back_per_decoding_step(monkeypatch, temperature):
    """Counted at the Python level (every way a tensor's values reach the host), as the
    difference between runs of different lengths: the prompt's checks are counted once."""
    model = random_model(SMALL_IMAGES, seed=11)
    rows = prompt_rows(SMALL_IMAGES)  # text, an image request (BOI last), EOI last: every rule runs
    ids, feats, mask = collate_prompts([Segment(i[0], f[0]) for i, f in rows], SMALL_IMAGES)
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    def run(steps):
        reads.clear()
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, counted(name))
        out = generate(model, ids, feats, mask, max_new_tokens=steps, eos_token_id=-1, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
        monkeypatch.undo()
        assert out.sequences.shape[1] == steps
        return list(reads)

    short, long = run(3), run(9)
    assert len(long) - len(short) == 6, long[len(short):]
    assert set(long[len(short):]) == {"tolist"}


def test_sampling_draws_as_torch_multinomial():
    logits = torch.randn(6, 50) * 2
    for seed in range(5):
        ours = sample_logits(logits, temperature=0.7, generator=torch.Generator().manual_seed(seed))
        theirs = torch.multinomial((logits / 0.7).softmax(-1), 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs[:, 0])
    with pytest.raises(RuntimeError, match="probability tensor contains either `inf`, `nan` or element < 0"):
        sample_logits(torch.full((2, 5), float("nan")), temperature=1.0)


@pytest.mark.cuda
def test_no_host_synchronisation_inside_the_decoding_loop_on_a_gpu():
    """CUDA's own count (torch.cuda.set_sync_debug_mode): one synchronisation per step, the read
    of the chosen tokens."""
    import warnings

    model = random_model(SMALL_IMAGES, seed=12).cuda()
    rows = prompt_rows(SMALL_IMAGES)
    ids, feats, mask = collate_prompts([Segment(i[0], f[0]) for i, f in rows], SMALL_IMAGES, "cuda")

    def syncs(steps, temperature):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, ids, feats, mask, max_new_tokens=steps, eos_token_id=-1, temperature=temperature,
                         generator=torch.Generator("cuda").manual_seed(0))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    for temperature in (0.0, 0.8):
        syncs(2, temperature)  # warm-up: kernels and allocator
        assert syncs(10, temperature) - syncs(4, temperature) == 6


# ---- `libra-lm generate` end to end, offline: image -> libra_tok ids -> LM -> text ------------------------
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
    images = image_segments(tok, [image], model.config)
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
        f"Error: {root / 'lm'} does not name its image tokenizer (no image_tokenizer/ sub-folder, no tokenizer "
        f"recorded in config.json, no vqgan.ckpt); pass --tokenizer PATH (a libra-tok folder or the official "
        f"vqgan.ckpt) or --tokenizer-preset tiny\n")
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
    short = LibraForCausalLM.from_pretrained(root / "lm", max_position_embeddings=80).save_pretrained(
        tmp_path / "short")
    (short / "tokenizer.model").write_bytes(sp.read_bytes())
    result = run_generate(short, asset_images[0], "--tokenizer-preset", "tiny")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert re.fullmatch(r"Error: the prompt has \d+ tokens but the model's context is 80 \(max_position_embeddings\); "
                        r"shorten the prompt\n", result.output)
