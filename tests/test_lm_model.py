"""LibraForCausalLM: equivalence with LLaMA, the bridge, hybrid input, loss, freezing, routing."""

import math

import pytest
import torch
import torch.nn.functional as F

from builders import MIXED, TINY, hf_llama_config, mixed_batch, randomize_
from libra_lm import LibraForCausalLM
from libra_lm.routing import Router, exact_low_rank_factors


# ---- the released shapes -----------------------------------------------------------------------------------
def test_libra_7b_shapes_and_parameter_count():
    # The released shapes (docs/official-formats.md#lm-folder) and their count of ~11.016 B parameters
    # (~132.4 M vision per layer).
    with torch.device("meta"):
        model = LibraForCausalLM("libra-7b")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    p = "model.layers.7."
    expected = {
        "model.embed_tokens.weight": (32000, 4096),
        "lm_head.weight": (32000, 4096),
        "model.vision_embed_tokens.0.weight": (514, 2048),
        "model.vision_embed_tokens.1.weight": (514, 2048),
        "model.vision_signal_norm.weight": (8192,),
        "model.vision_contiguous_signal_processor.weight": (4096, 8192),
        "model.norm.weight": (4096,),
        "model.vision_norm.weight": (4096,),
        "vision_lm_head.heads.0.weight": (514, 4096),
        "vision_lm_head.heads.1.weight": (514, 4096),
        p + "self_attn.q_proj.weight": (4096, 4096),
        p + "self_attn.vision_o_proj.weight_A": (1024, 4096),
        p + "self_attn.vision_o_proj.weight_B": (4096, 1024),
        p + "self_attn.vision_k_bridge_on_language.weight_A": (8, 4096),
        p + "self_attn.vision_v_bridge_on_vision.weight_B": (4096, 8),
        p + "mlp.gate_proj.weight": (11008, 4096),
        p + "mlp.down_proj.weight": (4096, 11008),
        p + "mlp.vision_gate_proj.weight_A": (2752, 4096),
        p + "mlp.vision_up_proj.weight_B": (11008, 2752),
        p + "mlp.vision_down_proj.weight_A": (1024, 11008),
        p + "mlp.vision_down_proj.weight_B": (4096, 1024),
        p + "vision_post_attention_layernorm.weight": (4096,),
    }
    assert {k: shapes[k] for k in expected} == expected
    vision_per_layer = sum(math.prod(s) for k, s in shapes.items() if k.startswith(p) and "vision" in k)
    assert abs(vision_per_layer / 1e6 - 132.4) < 0.05
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(total / 1e9 - 11.016) < 0.001


# ---- equivalence with LLaMA --------------------------------------------------------------------------------
def copy_llama_into_vision_(model: LibraForCausalLM) -> None:
    """Vision expert := the LLaMA weights (exact rank-complete factors), vision norms := text
    norms, bridges zero."""
    with torch.no_grad():
        for layer in model.model.layers:
            for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    expert = getattr(owner, "vision_" + name)
                    a, b = exact_low_rank_factors(getattr(owner, name).weight)
                    expert.weight_A.copy_(a)
                    expert.weight_B.copy_(b)
            layer.vision_input_layernorm.weight.copy_(layer.input_layernorm.weight)
            layer.vision_post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight)
            for name in ("k_bridge_on_language", "k_bridge_on_vision", "v_bridge_on_language", "v_bridge_on_vision"):
                getattr(layer.self_attn, "vision_" + name).weight_B.zero_()
        model.model.vision_norm.weight.copy_(model.model.norm.weight)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_equals_plain_llama_on_mixed_sequences(backend):
    from transformers import LlamaModel

    cfg = TINY.replace(vision_down_ratio=1)  # rank-complete experts can hold the LLaMA weights exactly
    torch.manual_seed(0)
    model = randomize_(LibraForCausalLM(cfg, attn_backend=backend)).eval()
    copy_llama_into_vision_(model)
    llama = LlamaModel(hf_llama_config(cfg)).eval()
    missing, unexpected = llama.load_state_dict(
        {k[len("model."):]: v for k, v in model.state_dict().items() if k.startswith("model.") and "vision" not in k},
        strict=False,
    )
    assert not unexpected and all("rotary" in k for k in missing)

    ids, feats = mixed_batch(cfg, MIXED)
    is_vision = ids[..., 0] >= cfg.text_vocab_size
    with torch.no_grad():
        out = model(ids, feats)
        x = model.model.embed(ids, feats, Router(is_vision))
        ref = llama(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(out.hidden_states, ref, rtol=1e-5, atol=1e-5)
    text_ref = model.lm_head(ref)[~is_vision]
    torch.testing.assert_close(out.text_logits[~is_vision], text_ref, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(out.text_logits[is_vision]).all() and torch.isneginf(out.vision_logits[~is_vision]).all()
    for c, head in enumerate(model.vision_lm_head.heads):
        torch.testing.assert_close(out.vision_logits[..., c, :][is_vision], head(ref)[is_vision], rtol=1e-5, atol=1e-5)


def test_bridge_changes_only_cross_modal_scores():
    # One layer; a sequence that starts with vision tokens: text 3-5 and 9-10 follow images.
    cfg = TINY.replace(num_hidden_layers=1)
    torch.manual_seed(1)
    model = randomize_(LibraForCausalLM(cfg, attn_backend="eager")).eval()
    ids, feats = mixed_batch(cfg, [[("i", 1), ("t", 3), ("i", 1), ("t", 2)]])
    is_vision = (ids[0, :, 0] >= cfg.text_vocab_size).tolist()
    assert is_vision == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 2
    with torch.no_grad():
        base = model(ids, feats).hidden_states[0]

    def moved_positions(bridge_name):
        bridge = getattr(model.model.layers[0].self_attn, bridge_name)
        saved = bridge.weight_B.detach().clone()
        with torch.no_grad():
            bridge.weight_B.add_(torch.randn_like(saved))
            out = model(ids, feats).hidden_states[0]
            bridge.weight_B.copy_(saved)
        return [bool(d > 1e-5) for d in (out - base).abs().amax(-1)]

    # Deltas of text keys/values reach only vision queries that follow a text token.
    expected_vision_q = [False] * 6 + [True] * 3 + [False] * 2
    assert moved_positions("vision_k_bridge_on_language") == expected_vision_q
    assert moved_positions("vision_v_bridge_on_language") == expected_vision_q
    # Deltas of vision keys/values reach only text queries (all follow an image here).
    expected_text_q = [False] * 3 + [True] * 3 + [False] * 3 + [True] * 2
    assert moved_positions("vision_k_bridge_on_vision") == expected_text_q
    assert moved_positions("vision_v_bridge_on_vision") == expected_text_q


# ---- hybrid input -------------------------------------------------------------------------------------
def test_hybrid_input_embedding():
    torch.manual_seed(2)
    model = randomize_(LibraForCausalLM(TINY)).eval()
    ids, feats = mixed_batch(TINY, [[("t", 2), ("i", 3), ("t", 1)]])
    is_vision = ids[..., 0] >= TINY.text_vocab_size
    m = model.model
    with torch.no_grad():
        x = m.embed(ids, feats, Router(is_vision))[0]
        local = ids[0] - TINY.text_vocab_size
        for t in range(ids.shape[1]):
            if not is_vision[0, t]:
                torch.testing.assert_close(x[t], m.embed_tokens.weight[ids[0, t, 0]])
                continue
            clip = feats[0, t] if local[t, 0] < TINY.codebook_size else torch.zeros(TINY.contiguous_signal_size)
            cat = torch.cat([m.vision_embed_tokens[0].weight[local[t, 0]], m.vision_embed_tokens[1].weight[local[t, 1]],
                             clip])
            normed = cat / torch.sqrt(cat.pow(2).mean() + TINY.rms_norm_eps) * m.vision_signal_norm.weight
            torch.testing.assert_close(x[t], m.vision_contiguous_signal_processor.weight @ normed, rtol=1e-5, atol=1e-5)
        # Absent features = zeros; features at text positions are never read.
        junk = feats.clone()
        junk[~is_vision] = 1e6
        torch.testing.assert_close(m.embed(ids, junk, Router(is_vision)), x[None])
        zero = feats.clone()
        zero[is_vision] = 0
        torch.testing.assert_close(m.embed(ids, None, Router(is_vision)), m.embed(ids, zero, Router(is_vision)))


def test_input_id_checks():
    model = LibraForCausalLM(TINY)
    v_t = TINY.text_vocab_size
    with pytest.raises(ValueError, match=r"input_ids outside \[0, 834\)"):
        model(torch.tensor([[[5, 5], [900, 900]]]))
    with pytest.raises(ValueError, match="mix modalities"):
        model(torch.tensor([[[5, 5], [v_t + 3, 7]]]))
    with pytest.raises(ValueError, match="same text id in every codebook"):
        model(torch.tensor([[[5, 6]]]))
    with pytest.raises(ValueError, match="BOI/EOI"):
        model(torch.tensor([[[TINY.boi_token_id, v_t + 4]]]))
    with pytest.raises(ValueError, match=r"clip_features must be \(B, N, C\) = \(1, 2, 192\)"):
        model(torch.tensor([[5, 6]]), torch.zeros(1, 2, 10))
    # (B, N) text ids are accepted and mean the same id in both columns.
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).text_logits, model(ids[..., None].expand(1, 3, 2)).text_logits)


# ---- loss ----------------------------------------------------------------------------------------------
def test_loss_equals_hand_computation():
    torch.manual_seed(3)
    model = randomize_(LibraForCausalLM(TINY)).eval()
    ids, feats = mixed_batch(TINY, MIXED, seed=4)
    labels = ids.clone()
    v_t = TINY.text_vocab_size
    # Official masking: BOI labels, the first text token after EOI; plus one arbitrary text label.
    labels[labels[..., 0] == TINY.boi_token_id] = -100
    after_eoi = torch.zeros_like(labels[..., 0], dtype=torch.bool)
    after_eoi[:, 1:] = ids[:, :-1, 0] == TINY.eoi_token_id
    labels[after_eoi] = -100
    labels[0, 2] = -100
    labels[1, 12, 1] = -100  # a single codebook ignored: per-codebook counts differ
    with torch.no_grad():
        out = model(ids, feats, labels=labels)

    # Joint [text | vision] logit space per codebook, -inf for the other modality; CE means.
    per_codebook = []
    for c in range(2):
        total, count = 0.0, 0
        for bi in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                y = int(labels[bi, t + 1, c])
                if y == -100:
                    continue
                joint = torch.cat([out.text_logits[bi, t], out.vision_logits[bi, t, c]]).double()
                total -= float(torch.log_softmax(joint, 0)[y])
                count += 1
        per_codebook.append(total / count)
    expected = sum(per_codebook) / 2
    assert abs(float(out.loss) - expected) < 1e-5
    # Same as F.cross_entropy on the materialised joint logits.
    joint = [torch.cat([out.text_logits, out.vision_logits[..., c, :]], -1)[:, :-1] for c in range(2)]
    ce = [F.cross_entropy(joint[c].reshape(-1, v_t + 514), labels[:, 1:, c].reshape(-1), ignore_index=-100)
          for c in range(2)]
    torch.testing.assert_close(out.loss, (ce[0] + ce[1]) / 2, rtol=1e-5, atol=1e-6)


def test_loss_rejects_cross_modal_labels():
    model = LibraForCausalLM(TINY)
    ids, feats = mixed_batch(TINY, [[("t", 2), ("i", 2), ("t", 2)]])
    with pytest.raises(ValueError, match="other modality"):
        model(ids, feats, labels=ids)  # the token before BOI would have to predict BOI


def test_loss_backward_and_gradient_checkpointing_match():
    torch.manual_seed(4)
    model = randomize_(LibraForCausalLM(TINY)).train()
    ids, feats = mixed_batch(TINY, MIXED, seed=5)
    labels = ids.clone()
    labels[labels[..., 0] == TINY.boi_token_id] = -100
    labels[:, 1:][ids[:, :-1, 0] == TINY.eoi_token_id] = -100
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        loss = model(ids, feats, labels=labels).loss
        loss.backward()
        grads.append((float(loss.detach()),
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys()
    assert len(grads[0][1]) == len(list(model.parameters()))  # every parameter takes part
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6)


# ---- freezing ------------------------------------------------------------------------------------------
def test_frozen_llm_trains_exactly_the_vision_parameters():
    torch.manual_seed(5)
    model = randomize_(LibraForCausalLM(TINY)).train()
    model.frozen_llm = True
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert trainable == {n for n, _ in model.named_parameters() if "vision" in n}
    # The official frozen-LLM filter ("vision" in the name): bridges on text tokens train too; LLaMA parts
    # and embeddings do not.
    assert "model.layers.0.self_attn.vision_k_bridge_on_language.weight_A" in trainable
    for frozen in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                   "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert frozen not in trainable
    ids, feats = mixed_batch(TINY, [[("t", 2), ("i", 4), ("t", 3)]])
    labels = ids.clone()
    labels[:, :4] = -100
    labels[:, 8] = -100  # first text token after EOI
    model(ids, feats, labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and len(with_grad) > 0.9 * len(trainable)
    model.frozen_llm = False
    assert model.num_parameters(trainable_only=True) == model.num_parameters()


# ---- packing and padding --------------------------------------------------------------------------------
def test_packed_segments_equal_separate_sequences():
    torch.manual_seed(6)
    model = randomize_(LibraForCausalLM(TINY)).eval()
    a_ids, a_feats = mixed_batch(TINY, [[("t", 2), ("i", 3), ("t", 3)]], seed=1)
    b_ids, b_feats = mixed_batch(TINY, [[("t", 1), ("i", 2), ("t", 5)]], seed=2)
    packed_ids, packed_feats = torch.cat([a_ids, b_ids], 1), torch.cat([a_feats, b_feats], 1)
    seg = torch.tensor([[0] * a_ids.shape[1] + [1] * b_ids.shape[1]])
    with torch.no_grad():
        packed = model(packed_ids, packed_feats, segment_ids=seg)
        sep = [model(a_ids, a_feats), model(b_ids, b_feats)]
    na = a_ids.shape[1]
    torch.testing.assert_close(packed.hidden_states[:, :na], sep[0].hidden_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.hidden_states[:, na:], sep[1].hidden_states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_left_padded_batch_equals_single_rows(backend):
    torch.manual_seed(7)
    model = randomize_(LibraForCausalLM(TINY, attn_backend=backend)).eval()
    long_ids, long_feats = mixed_batch(TINY, [[("t", 2), ("i", 4), ("t", 4)]], seed=3)
    short_ids, short_feats = mixed_batch(TINY, [[("t", 1), ("i", 2), ("t", 2)]], seed=4)
    pad = long_ids.shape[1] - short_ids.shape[1]
    ids = torch.cat([long_ids, torch.cat([torch.zeros(1, pad, 2, dtype=torch.long), short_ids], 1)])
    feats = torch.cat([long_feats, torch.cat([torch.zeros(1, pad, 192), short_feats], 1)])
    mask = torch.ones(2, ids.shape[1], dtype=torch.long)
    mask[1, :pad] = 0
    with torch.no_grad():
        batch = model(ids, feats, attention_mask=mask)
        ref_long, ref_short = model(long_ids, long_feats), model(short_ids, short_feats)
    torch.testing.assert_close(batch.text_logits[:1], ref_long.text_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.text_logits[1:, pad:], ref_short.text_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.vision_logits[1:, pad:], ref_short.vision_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_bf16_autocast_on_gpu_matches_fp32():
    torch.manual_seed(8)
    model = randomize_(LibraForCausalLM(TINY)).cuda().eval()
    ids, feats = mixed_batch(TINY, MIXED)
    ids, feats = ids.cuda(), feats.cuda()
    with torch.no_grad():
        ref = model(ids, feats).hidden_states
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, feats).hidden_states
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_run_idle_modules_gives_every_parameter_a_gradient(modality):
    """Data-parallel training runs the modules of a modality a batch lacks on zero rows: the
    outputs do not change and every parameter gets a gradient (zero for the idle modules)."""
    torch.manual_seed(0)
    model = randomize_(LibraForCausalLM(TINY))
    v_t = TINY.text_vocab_size
    if modality == "text":
        ids = torch.randint(3, v_t, (2, 9))[..., None].expand(2, 9, 2).clone()
    else:
        ids = v_t + torch.randint(0, TINY.codebook_size, (2, 9, 2))
    plain = model(ids, labels=ids)
    model.run_idle_modules = True
    idle = model(ids, labels=ids)
    assert torch.equal(plain.loss, idle.loss) and torch.equal(plain.text_logits, idle.text_logits)
    idle.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    other = "vision" if modality == "text" else "text"
    idle_params = [(n, p) for n, p in model.named_parameters()
                   if ("vision" in n) == (other == "vision") and "bridge" not in n]
    assert idle_params and all(p.grad.abs().sum() == 0 for n, p in idle_params if n.startswith("model.layers"))
