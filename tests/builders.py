"""Builders of small test objects shared by several test modules (fixtures are in conftest.py;
what one module needs stays in that module):

- the repository root;
- the image tokenizer: the tiny preset's CLIP as an HF model, the official LFQ ids written out,
  official vqgan.ckpt state dicts, folders and parameter shapes written by hand;
- the LM: the tiny config, random weights, mixed text/image batches, HF LLaMA models and official
  Libra LM folders written by hand;
- text: the tiny LLaMA-layout SentencePiece model and the captions of the sample images;
- run folders and commands: objects that a weights-only unpickler refuses, the one-line errors
  of a failed command, latest.json, a free TCP port.
"""

import json
import socket
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from libra_lm import LibraConfig, train_sentencepiece
from libra_tok import ImageTokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]


# ---- the image tokenizer: HF CLIP, the official LFQ and checkpoint layout ----------------------------
def hf_tiny_clip_config():
    """The HF CLIPVisionConfig of the tiny preset's ViT (open_clip `libra-tiny-vit`)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            image_size=112, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def hf_tiny_clip():
    """The tiny preset's ViT as an HF CLIPVisionModel (seed 3) with non-trivial random weights."""
    from transformers import CLIPVisionModel

    torch.manual_seed(3)
    model = CLIPVisionModel(hf_tiny_clip_config()).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped tensor shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_vision_state(model):
    """HF vision-tower weights relative to `vision_model.` (transformers 4 nests, 5 does not)."""
    return {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


def official_ids(values: torch.Tensor, bits: int = 9, groups: int = 2) -> torch.Tensor:
    """The official LFQ, written out: value > 0 -> 1; dims [g*bits, (g+1)*bits) form id g,
    the first dim of a group is the most significant bit."""
    out = torch.zeros(*values.shape[:-1], groups, dtype=torch.long)
    for g in range(groups):
        for k in range(bits):
            bit = (values[..., g * bits + k] > 0).long()
            out[..., g] += bit * 2 ** (bits - 1 - k)
    return out


CLIP_PREFIX = "encoder.vision_tower.vision_model."  # the CLIP tower's keys in the official vqgan.ckpt


def official_layout(hf_clip, ref: ImageTokenizer) -> dict:
    """A tokenizer state dict written by hand in the official VQModel naming of vqgan.ckpt
    (docs/official-formats.md#tokenizer-checkpoint): the CLIP of `hf_clip`, the quantizer and decoder of `ref`."""
    sd = {CLIP_PREFIX + k: v.clone() for k, v in hf_vision_state(hf_clip).items()}
    positions = sd[CLIP_PREFIX + "embeddings.position_embedding.weight"].shape[0]
    # position_ids: persistent in the official copy
    sd[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    q = ref.quantizer
    sd["quant_conv.weight"], sd["quant_conv.bias"] = q.quant_conv.weight.clone(), q.quant_conv.bias.clone()
    sd["quantize.project_in.weight"] = q.lfq.project_in.weight.clone()
    sd["quantize.project_in.bias"] = q.lfq.project_in.bias.clone()
    sd["quantize.project_out.weight"] = q.lfq.project_out.weight.clone()
    sd["quantize.project_out.bias"] = q.lfq.project_out.bias.clone()
    sd["quantize.mask"] = torch.tensor([256, 128, 64, 32, 16, 8, 4, 2, 1])
    sd["post_quant_conv.weight"] = q.post_quant_conv.weight.clone()
    sd["post_quant_conv.bias"] = q.post_quant_conv.bias.clone()
    sd.update({"decoder." + k: v.clone() for k, v in ref.decoder.state_dict().items()})
    # Training-only parts that the loader must drop.
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    return sd


def official_l336_shapes() -> dict[str, tuple]:
    """Every tensor of the official vqgan.ckpt (docs/official-formats.md#tokenizer-checkpoint), written out."""
    s = {}
    c = CLIP_PREFIX
    s[c + "embeddings.class_embedding"] = (1024,)
    s[c + "embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    s[c + "embeddings.position_embedding.weight"] = (577, 1024)
    s[c + "embeddings.position_ids"] = (1, 577)
    for n in ("pre_layrnorm", "post_layernorm"):
        s[c + n + ".weight"] = s[c + n + ".bias"] = (1024,)
    for i in range(24):
        L = f"{c}encoder.layers.{i}."
        for p in "qkv":
            s[L + f"self_attn.{p}_proj.weight"], s[L + f"self_attn.{p}_proj.bias"] = (1024, 1024), (1024,)
        s[L + "self_attn.out_proj.weight"], s[L + "self_attn.out_proj.bias"] = (1024, 1024), (1024,)
        for n in ("layer_norm1", "layer_norm2"):
            s[L + n + ".weight"] = s[L + n + ".bias"] = (1024,)
        s[L + "mlp.fc1.weight"], s[L + "mlp.fc1.bias"] = (4096, 1024), (4096,)
        s[L + "mlp.fc2.weight"], s[L + "mlp.fc2.bias"] = (1024, 4096), (1024,)
    s["quant_conv.weight"], s["quant_conv.bias"] = (1024, 4096, 1, 1), (1024,)
    s["quantize.project_in.weight"], s["quantize.project_in.bias"] = (18, 1024), (18,)
    s["quantize.project_out.weight"], s["quantize.project_out.bias"] = (1024, 18), (1024,)
    s["quantize.mask"] = (9,)
    s["post_quant_conv.weight"], s["post_quant_conv.bias"] = (1024, 1024, 1, 1), (1024,)

    def conv(name, cout, cin, k):
        s[name + ".weight"], s[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, ch):
        s[name + ".weight"] = s[name + ".bias"] = (ch,)

    def resblock(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def attn(name, ch):
        norm(name + ".norm", ch)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", ch, ch, 1)

    conv("decoder.conv_in", 1024, 1024, 3)
    resblock("decoder.mid.block_1", 1024, 1024)
    attn("decoder.mid.attn_1", 1024)
    resblock("decoder.mid.block_2", 1024, 1024)
    chans = {4: 1024, 3: 512, 2: 256, 1: 128, 0: 128}
    cin = 1024
    for level in (4, 3, 2, 1, 0):
        for b in range(3):
            resblock(f"decoder.up.{level}.block.{b}", cin if b == 0 else chans[level], chans[level])
            if level == 4:
                attn(f"decoder.up.4.attn.{b}", 1024)
        cin = chans[level]
        if level > 0:
            conv(f"decoder.up.{level}.upsample.conv", chans[level], chans[level], 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 3, 128, 3)
    return s


def write_official_tokenizer_files(folder, state_dict, monkeypatch=None):
    """vqgan.ckpt + vision_tokenizer_config.yaml of the tiny architecture in `folder`, with the
    CLIP folder its encoder_name names (the HF config.json of the tiny ViT), as the official
    loader expects. (`monkeypatch` is not needed any more.)"""
    cfg = TokenizerConfig.from_preset("tiny")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "global_step": 1}, folder / "vqgan.ckpt")
    hf_tiny_clip_config().save_pretrained(folder / "tiny-clip-vit")
    (folder / "vision_tokenizer_config.yaml").write_text(yaml.safe_dump({
        "params": {"embed_dim": cfg.embed_dim, "codebook_size": 512, "num_codebook": 2,
                   "ddconfig": {"encoder_name": "tiny-clip-vit", "select_layer": list(cfg.feature_layers),
                                "z_channels": cfg.z_channels, "resolution": cfg.resolution, "ch": cfg.ch,
                                "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
                                "attn_resolutions": list(cfg.attn_resolutions),
                                "num_attn_head": cfg.num_attn_heads}}}))
    return folder


# ---- the LM: tiny config, random weights, mixed batches, HF LLaMA, the official layout -------------------
TINY = LibraConfig.from_preset("tiny")
SMALL = LibraConfig.from_preset("tiny", num_image_tokens=4)  # 4 patches: examples short enough to write out


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norms around 1, bridges non-zero) so that no part is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if ("norm" in name) else noise)
    return model


def mixed_batch(config: LibraConfig, layouts, seed: int = 0):
    """(input_ids (B, N, 2), clip_features (B, N, C)) from per-row layouts: a list of ("t", n)
    text runs and ("i", n) images (BOI + n patches + EOI)."""
    g = torch.Generator().manual_seed(seed)
    rows, feats = [], []
    for layout in layouts:
        ids, f = [], []
        for kind, count in layout:
            if kind == "t":
                t = torch.randint(3, config.text_vocab_size, (count,), generator=g)
                ids.append(t[:, None].expand(count, config.num_codebooks))
                f.append(torch.randn(count, config.contiguous_signal_size, generator=g))  # must be ignored
            else:
                codes = torch.randint(0, config.codebook_size, (count, config.num_codebooks), generator=g)
                ids += [torch.full((1, config.num_codebooks), config.boi_token_id), codes + config.text_vocab_size,
                        torch.full((1, config.num_codebooks), config.eoi_token_id)]
                f.append(torch.randn(count + 2, config.contiguous_signal_size, generator=g))
        rows.append(torch.cat(ids))
        feats.append(torch.cat(f))
    n = {r.shape[0] for r in rows}
    assert len(n) == 1, "rows of a batch must have one length"
    return torch.stack(rows), torch.stack(feats)


MIXED = [[("t", 3), ("i", 5), ("t", 4), ("i", 3), ("t", 2)], [("t", 1), ("i", 9), ("t", 9)]]


def hf_llama_config(config: LibraConfig, **extra):
    """The transformers LlamaConfig of the text part of `config`."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=config.text_vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        attn_implementation="eager",
    )
    return LlamaConfig(**{**kwargs, **extra})


def hf_llama(seed=0, **extra):
    """A random HF LlamaForCausalLM of the tiny LM's text sizes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(hf_llama_config(TINY, **extra)), seed=seed).eval()


def official_state_dict(cfg: LibraConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bfloat16 weights of an official Libra LM of `cfg`'s sizes, in the official naming."""
    g = torch.Generator().manual_seed(seed)
    d, i, v, c = cfg.hidden_size, cfg.intermediate_size, cfg.text_vocab_size, cfg.contiguous_signal_size
    ra, ri = d // 4, i // 4  # expert ranks: out_features // vision_down_ratio
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "lm_head.weight": (v, d),
        "model.vision_embed_tokens.0.weight": (514, d // 2),
        "model.vision_embed_tokens.1.weight": (514, d // 2),
        "model.vision_signal_norm.weight": (d + c,),
        "model.vision_contiguous_signal_processor.weight": (d, d + c),
        "model.norm.weight": (d,),
        "model.vision_norm.weight": (d,),
        "vision_lm_head.heads.0.weight": (514, d),
        "vision_lm_head.heads.1.weight": (514, d),
    }
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        for proj in "qkvo":
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (d, d)
            shapes[f"{p}self_attn.vision_{proj}_proj.weight_A"] = (ra, d)
            shapes[f"{p}self_attn.vision_{proj}_proj.weight_B"] = (d, ra)
        for kv in "kv":
            for side in ("language", "vision"):
                shapes[f"{p}self_attn.vision_{kv}_bridge_on_{side}.weight_A"] = (8, d)
                shapes[f"{p}self_attn.vision_{kv}_bridge_on_{side}.weight_B"] = (d, 8)
        shapes[f"{p}mlp.gate_proj.weight"] = (i, d)
        shapes[f"{p}mlp.up_proj.weight"] = (i, d)
        shapes[f"{p}mlp.down_proj.weight"] = (d, i)
        for proj in ("gate", "up"):
            shapes[f"{p}mlp.vision_{proj}_proj.weight_A"] = (ri, d)
            shapes[f"{p}mlp.vision_{proj}_proj.weight_B"] = (i, ri)
        shapes[f"{p}mlp.vision_down_proj.weight_A"] = (ra, i)
        shapes[f"{p}mlp.vision_down_proj.weight_B"] = (d, ra)
        for norm in ("input_layernorm", "post_attention_layernorm", "vision_input_layernorm",
                     "vision_post_attention_layernorm"):
            shapes[f"{p}{norm}.weight"] = (d,)
    return {k: (torch.randn(s, generator=g) * 0.1).to(torch.bfloat16) for k, s in shapes.items()}


def official_extras(cfg: LibraConfig) -> dict[str, torch.Tensor]:
    """Placeholders and buffers the official checkpoint may also hold (docs/official-formats.md#lm-folder)."""
    d, v = cfg.hidden_size, cfg.text_vocab_size
    extras = {
        "vision_hidden_placeholder": torch.randn(d),
        "naive_placeholder": torch.zeros(d),
        "vision_logits_placeholder": torch.full((1, 514), float("-inf")),
        "language_logits_placeholder": torch.full((1, v), float("-inf")),
        "eoi_to_newline_logits_placeholder": torch.full((1, 1, 1, v + 514), float("-inf")),
    }
    for layer in range(cfg.num_hidden_layers):
        extras[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(cfg.head_dim // 2)
    return {k: t.to(torch.bfloat16) for k, t in extras.items()}


def official_config_json(cfg: LibraConfig) -> dict:
    """The config.json of an official Libra LM folder of `cfg`'s sizes."""
    return {
        "architectures": ["LibraForCausalLM"], "model_type": "libra",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads, "vocab_size": cfg.text_vocab_size,
        "rms_norm_eps": 1e-06, "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        "vision_down_ratio": 4, "vision_vocab_size": 514, "vision_codebook_num": 2,
        "max_vision_token_length": cfg.num_image_tokens + 2, "newline_token_id": 13,
        "contiguous_signal_size": cfg.contiguous_signal_size, "image_feature_resolution": 8,
        "vision_prediction_mode": "1d", "use_bridge": True, "bridge_rank": 8, "concat_signals": True,
        "norm_signals": True, "addition_mode": False, "use_vision_position_embedding": False,
        "unified_head": False, "use_2d_rope": False,
    }


def write_official_folder(folder, cfg=TINY, seed=0):
    """An official Libra LM folder (docs/official-formats.md#lm-folder), written by hand: two
    safetensors shards + model.safetensors.index.json + config.json, as the released folders.
    Returns the weights it wrote."""
    folder.mkdir(parents=True)
    weights = official_state_dict(cfg, seed)
    everything = {**weights, **official_extras(cfg)}
    keys = sorted(everything)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: everything[k] for k in shard_keys}, folder / name)
        weight_map.update({k: name for k in shard_keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(official_config_json(cfg)))
    return weights


# ---- text: the tiny SentencePiece model, captions of the sample images ---------------------------------
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat is sitting on a red sofa next to a window.",
    "USER: Describe the picture in detail. ASSISTANT: There are two dogs running in a green park.",
    "a photo of an astronaut standing on the moon with the earth in the background",
    "a close up of a coffee cup on a wooden table, the morning light is warm",
    "the brick wall is old and the grass in front of it is growing tall",
    "a camera man is standing in a field of gravel near the river at noon",
    "the hubble deep field shows thousands of distant galaxies in the dark sky",
    "a retina image with many small blood vessels, seen through a microscope",
    "What colour is the car? The car is blue and it is parked in the street.",
    "How many people are there? There are 3 people and 12 birds in the photo.",
] * 4


def train_tiny_text_tokenizer(folder: Path, vocab_size: int | None = None) -> Path:
    """A LLaMA-layout SentencePiece model sized for the tiny LM preset."""
    vocab_size = vocab_size or LibraConfig.from_preset("tiny").text_vocab_size
    return train_sentencepiece(CORPUS, folder / "tokenizer.model", vocab_size)


CAPTIONS = {
    "astronaut.png": "A portrait of an ASTRONAUT in a white suit",
    "brick.png": "an old brick wall ## with grey mortar",
    "camera.png": "a camera man standing   in a field",
    "chelsea.png": "a cat named chelsea looking at the camera",
    "coffee.png": "a cup of coffee on a saucer",
    "grass.png": "green grass growing in the sun",
    "hubble_deep_field.jpg": "thousands of distant galaxies in the dark sky",
    "retina.jpg": "a retina image with many small blood vessels",
    "rocket.jpg": "a rocket launching into the blue sky",
    # gravel.png has no caption: pretraining leaves it out
}


# ---- run folders and commands ----------------------------------------------------------------------------
class Opaque:  # an object a weights-only unpickler refuses
    pass


class MarkerPayload:
    """Pickles to a call of open(marker, "w"): loading the file with a full unpickler creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli_error(res) -> str:
    """The one `Error: ...` line of a failed command (and no traceback)."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.output
    return errors[0]


def point_latest_at(out_dir, step):
    latest = {"file": f"step-{step:08d}.pt", "step": step}
    (Path(out_dir) / "checkpoints" / "latest.json").write_text(json.dumps(latest))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# ---- bridged attention: the dense oracle, sequence layouts, random inputs --------------------------------
def bridged_oracle(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """The official two-view math (`attn_with_bridge`, libra/models/libra/modeling_libra.py), dense:
    both score matrices, rows picked by query modality, one softmax per query. Returns (out, lse)."""
    import math

    n, d = q.shape[-2:]
    same = (is_vision[:, :, None] == is_vision[:, None, :])[:, None]  # (B, 1, N, N)
    scores = torch.where(same, q @ k.transpose(-1, -2), q @ k_x.transpose(-1, -2)) / math.sqrt(d)
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None])[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p * same) @ v + (p * ~same) @ v_x
    return out, torch.logsumexp(scores, dim=-1)


BRIDGED_LAYOUTS = ["interleaved", "images", "packed", "all_text", "all_vision"]


def bridged_layout(kind: str, b: int, n: int, gen: torch.Generator):
    """is_vision (B, N) and segment_ids (B, N) or None for a named sequence layout: `interleaved`
    (modality flips at random), `images` (text and image runs), `packed` (the same in packed
    samples), `all_text`, `all_vision`, `long_segments` (text, two segments of N/3 and 2N/3: whole
    key blocks and query tiles inside one segment)."""
    if kind == "interleaved":  # modality flips at random: every tile boundary case
        return torch.rand(b, n, generator=gen) < 0.5, None
    if kind in ("images", "packed"):
        is_vision = torch.zeros(b, n, dtype=torch.bool)
        segment = torch.zeros(b, n, dtype=torch.long)
        for row in range(b):
            pos, seg = 0, 0
            while pos < n:
                text = int(torch.randint(3, max(4, n // 8), (1,), generator=gen))
                image = int(torch.randint(5, max(6, n // 4), (1,), generator=gen))
                segment[row, pos:] = seg
                pos += text
                is_vision[row, pos:pos + image] = True
                pos += image
                if kind == "packed" and torch.rand(1, generator=gen) < 0.6:
                    seg += 1  # the next text starts a new packed sample
        return is_vision, (segment if kind == "packed" else None)
    if kind == "all_text":
        return torch.zeros(b, n, dtype=torch.bool), None
    if kind == "all_vision":
        return torch.ones(b, n, dtype=torch.bool), None
    if kind == "long_segments":
        segment = (torch.arange(n) >= n // 3).long().expand(b, n).contiguous()
        return torch.zeros(b, n, dtype=torch.bool), segment
    raise ValueError(kind)


def random_qkv(b, h, n, d, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v, k_x, v_x (B, H, N, d), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(5)]


def rel_err(x, ref):
    """||x - ref|| / ||ref||; a gradient that must be zero (no query of that view) must be 0."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def max_err(x, ref):
    """Largest elementwise error over the largest magnitude: catches one wrong row or tile
    that a norm would average away."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ---- training runs: the damaged-checkpoint story both trainers tell ------------------------------------
def check_damaged_checkpoint_flow(main, cfg, train, rerun: list[str], caplog) -> None:
    """With checkpoints at steps 2 and 4 of a 6-step run in `cfg.out_dir`, and step 4 damaged:
    `train --resume` names the damaged file and the intact one; a rerun without --resume (the
    `rerun` arguments) names the folder and the option; after the damaged file is deleted, as the
    message says, `train(cfg, resume=True)` resumes from step 2 and finishes."""
    from click.testing import CliRunner

    ckpt = Path(cfg.out_dir) / "checkpoints"
    last, good = ckpt / "step-00000004.pt", ckpt / "step-00000002.pt"
    runner = CliRunner()
    error = cli_error(runner.invoke(main, ["train", "--out-dir", cfg.out_dir, "--resume"]))
    assert error.startswith(f"Error: {last} is damaged ("), error
    assert error.endswith(f"); {good} is intact: delete {last.name} to resume from it"), error
    error = cli_error(runner.invoke(main, ["train", *rerun, "--out-dir", cfg.out_dir]))
    assert error == (f"Error: {cfg.out_dir} already holds checkpoints (last: step-00000004.pt); pass --resume to "
                     "continue that run or choose another --out-dir")
    last.unlink()
    with caplog.at_level("WARNING", logger="libra_tok.run"):
        result = train(cfg, resume=True, progress=False)
    assert result.step == 6
    assert f"latest.json names step-00000004.pt, which is missing; resuming from {good}" in caplog.text
