"""LibraForCausalLM: LLaMA with a routed visual expert, the cross-modal bridge and hybrid image input.

    model = LibraForCausalLM.from_pretrained("path")        # ours, an official Libra folder, or HF LLaMA
    out = model(input_ids, clip_features, labels=labels)    # input_ids (B, N, 2) in the joint id space
    out.loss, out.text_logits (B, N, V_t), out.vision_logits (B, N, 2, 514)

Paper Sec. 3.1 with the official behaviour (official libra/models/libra/modeling_libra.py;
docs/official-formats.md#lm-behaviour). Module and parameter names are the official ones
(`model.layers.0.self_attn.vision_q_proj.weight_A`, ...), so official and HF LLaMA checkpoints
map onto this model key for key (docs/official-formats.md#lm-folder).

Inputs are checked where they enter: a call of `forward` checks its ids (one host
synchronisation); `decode_step`, the hot path of generation, checks nothing and synchronises
nothing, its ids being the model's own samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .attention import BACKENDS, bridged_attention
from .config import LibraConfig
from .routing import LowRankLinear, RMSNorm, Router, init_official_, swiglu
from .segments import as_joint_ids, check_joint_ids

IGNORE_INDEX = -100


@dataclass
class LibraOutput:
    loss: torch.Tensor | None
    text_logits: torch.Tensor  # (B, n, V_t) float32, -inf at vision positions
    vision_logits: torch.Tensor  # (B, n, num_codebooks, vision_vocab) float32, -inf at text positions
    hidden_states: torch.Tensor  # (B, n, D) after the routed final norm
    past_key_values: "KVCache | None" = None
    token_losses: torch.Tensor | None = None  # (B, n-1, codebooks) cross-entropy per label, 0 where ignored


# ---- KV cache ---------------------------------------------------------------------------------
class KVCache:
    """Keys and values of both views per layer (after RoPE), plus the modality and padding of
    every cached position. Buffers grow by doubling, or are sized once with `capacity`."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.layers: list[list[torch.Tensor] | None] = [None] * num_layers
        self.capacity = capacity
        self.length = 0
        self.is_vision: torch.Tensor | None = None  # (B, length) bool
        self.key_mask: torch.Tensor | None = None  # (B, length) bool, True = real token
        self.has_padding = False  # whether key_mask holds padding (known on the host)

    def update(self, layer: int, new: list[torch.Tensor]) -> list[torch.Tensor]:
        """Write `new` [k, v, k_x, v_x] (B, H, n, d) after the cached positions; return the
        full tensors (B, H, length + n, d). `length` advances in `advance`, after all layers."""
        start, n = self.length, new[0].shape[2]
        end = start + n
        bufs = self.layers[layer]
        if bufs is None or bufs[0].shape[2] < end:
            cap = max(end, self.capacity, 2 * (bufs[0].shape[2] if bufs is not None else 0))
            grown = [t.new_empty((*t.shape[:2], cap, t.shape[3])) for t in new]
            if bufs is not None:
                for g, old in zip(grown, bufs, strict=True):
                    g[:, :, :start] = old[:, :, :start]
            bufs = self.layers[layer] = grown
        out = []
        for buf, t in zip(bufs, new, strict=True):
            buf[:, :, start:end] = t
            out.append(buf[:, :, :end])
        return out

    def advance(self, is_vision: torch.Tensor, key_mask: torch.Tensor, has_padding: bool) -> None:
        self.is_vision, self.key_mask, self.has_padding = is_vision, key_mask, has_padding
        self.length = is_vision.shape[1]


# ---- rotary position embedding (LLaMA, 1-D positions) -------------------------------------------
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin (B, 1, N, d) as HF LlamaRotaryEmbedding (fp32 frequencies, cast at the end)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # In x's dtype, as HF LLaMA (under autocast x is bf16 while the tables follow the weights).
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@dataclass
class _Context:
    """What every layer needs for one forward pass."""

    router: Router
    cos: torch.Tensor
    sin: torch.Tensor
    key_is_vision: torch.Tensor  # (B, Nk) modality of all keys (cache included)
    segment_ids: torch.Tensor | None  # (B, Nk)
    key_padding_mask: torch.Tensor | None  # (B, Nk) True = real
    backend: str
    cache: KVCache | None
    layout_cache: dict  # shared by the layers' attention calls (same layout throughout)
    probe: Callable | None = None  # LibraForCausalLM.attention_probe


def key_padding_mask(attention_mask, cache, b: int, n: int, past: int, device) -> torch.Tensor:
    """(B, past + N) bool, True for real tokens: `attention_mask` given for the new positions
    (B, N) or for all (B, past + N), the cache's mask before the new ones; all real when None."""
    if attention_mask is None:
        new = torch.ones(b, n, dtype=torch.bool, device=device)
        return new if past == 0 else torch.cat([cache.key_mask, new], 1)
    attention_mask = attention_mask.to(device).bool()
    if tuple(attention_mask.shape) == (b, past + n):
        return attention_mask
    if past and tuple(attention_mask.shape) == (b, n):
        return torch.cat([cache.key_mask, attention_mask], 1)
    raise ValueError(f"attention_mask must be (B, N) = ({b}, {n})"
                     + (f" or (B, past + N) = ({b}, {past + n})" if past else "")
                     + f", got {tuple(attention_mask.shape)}")


class TrainableParameters:
    """Parameter views of a model (mixed into nn.Module subclasses: the LM, HoVLE, its stage-1
    objective): what trains is what requires a gradient."""

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_trainable_parameters())

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return sum(p.numel() for p in params)


# ---- the decoder layer ---------------------------------------------------------------------------
class LibraAttention(nn.Module):
    def __init__(self, config: LibraConfig, layer_idx: int):
        super().__init__()
        d, std = config.hidden_size, config.initializer_range
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        rank = config.expert_rank(d)
        self.vision_q_proj = LowRankLinear(d, d, rank, std=std)
        self.vision_k_proj = LowRankLinear(d, d, rank, std=std)
        self.vision_v_proj = LowRankLinear(d, d, rank, std=std)
        self.vision_o_proj = LowRankLinear(d, d, rank, std=std)
        # Bridges, applied to each token by its own modality (official `LibraAttention`): "_on_language"
        # is the delta of text keys/values as seen by vision queries, "_on_vision" the reverse.
        r = config.bridge_rank
        self.vision_k_bridge_on_language = LowRankLinear(d, d, r, zero_init_b=True, std=std)
        self.vision_k_bridge_on_vision = LowRankLinear(d, d, r, zero_init_b=True, std=std)
        self.vision_v_bridge_on_language = LowRankLinear(d, d, r, zero_init_b=True, std=std)
        self.vision_v_bridge_on_vision = LowRankLinear(d, d, r, zero_init_b=True, std=std)

    def forward(self, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
        router = ctx.router
        b, n, _ = h.shape
        h_text, h_vision = router.split(h)

        def routed(text_mod: nn.Module, vision_mod: nn.Module) -> torch.Tensor:
            text = text_mod(h_text) if router.runs_text() else None
            vision = vision_mod(h_vision) if router.runs_vision() else None
            return router.merge(text, vision).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q = routed(self.q_proj, self.vision_q_proj)
        k = routed(self.k_proj, self.vision_k_proj)
        v = routed(self.v_proj, self.vision_v_proj)
        if ctx.cache is None and not router.run_idle and (router.num_text == 0 or router.num_vision == 0):
            k_x, v_x = k, v  # one modality, no cache: no cross-modal pair reads a bridged view
        else:
            # The bridged views get the delta before RoPE, as the official code.
            k_x = k + routed(self.vision_k_bridge_on_language, self.vision_k_bridge_on_vision)
            v_x = v + routed(self.vision_v_bridge_on_language, self.vision_v_bridge_on_vision)
        q, k, k_x = (apply_rope(t, ctx.cos, ctx.sin) for t in (q, k, k_x))
        if ctx.cache is not None:
            k, v, k_x, v_x = ctx.cache.update(self.layer_idx, [k, v, k_x, v_x])
        if ctx.probe is not None:  # what this layer's attention reads (libra_lm.visual.attention_maps)
            ctx.probe(self.layer_idx, q, k, k_x, ctx.key_is_vision, ctx.key_padding_mask)
        out = bridged_attention(
            q, k, v, k_x, v_x, ctx.key_is_vision,
            segment_ids=ctx.segment_ids, key_padding_mask=ctx.key_padding_mask, backend=ctx.backend,
            layout_cache=ctx.layout_cache,
        )
        out = out.transpose(1, 2).reshape(b, n, -1)
        return router(out, self.o_proj, self.vision_o_proj)


class LibraMLP(nn.Module):
    """SwiGLU for text (LLaMA) and a low-rank SwiGLU of the same width for vision."""

    def __init__(self, config: LibraConfig):
        super().__init__()
        d, i, std = config.hidden_size, config.intermediate_size, config.initializer_range
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.vision_gate_proj = LowRankLinear(d, i, config.expert_rank(i), std=std)
        self.vision_up_proj = LowRankLinear(d, i, config.expert_rank(i), std=std)
        self.vision_down_proj = LowRankLinear(i, d, config.expert_rank(d), std=std)

    def forward(self, h: torch.Tensor, router: Router) -> torch.Tensor:
        return router(
            h,
            lambda x: swiglu(x, self.gate_proj, self.up_proj, self.down_proj),
            lambda x: swiglu(x, self.vision_gate_proj, self.vision_up_proj, self.vision_down_proj),
        )


class LibraDecoderLayer(nn.Module):
    def __init__(self, config: LibraConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LibraAttention(config, layer_idx)
        self.mlp = LibraMLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.vision_input_layernorm = RMSNorm(d, eps)
        self.vision_post_attention_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        h = ctx.router(x, self.input_layernorm, self.vision_input_layernorm)
        x = x + self.self_attn(h, ctx)
        h = ctx.router(x, self.post_attention_layernorm, self.vision_post_attention_layernorm)
        return x + self.mlp(h, ctx.router)


# ---- the model ------------------------------------------------------------------------------------
class LibraModel(nn.Module):
    """Embeddings, decoder layers and the routed final norm (official `LibraModel`)."""

    def __init__(self, config: LibraConfig):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.embed_tokens = nn.Embedding(config.text_vocab_size, d, padding_idx=config.pad_token_id)
        self.vision_embed_tokens = nn.ModuleList(
            nn.Embedding(config.vision_vocab_size, d // config.num_codebooks) for _ in range(config.num_codebooks)
        )
        signal = d + config.contiguous_signal_size
        self.vision_signal_norm = RMSNorm(signal, config.rms_norm_eps)
        self.vision_contiguous_signal_processor = nn.Linear(signal, d, bias=False)
        self.layers = nn.ModuleList(LibraDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.vision_norm = RMSNorm(d, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor, clip_features: torch.Tensor | None, router: Router) -> torch.Tensor:
        """Text: LLaMA embedding. Vision (hybrid input, official
        `get_inputs_embeds_from_multicodebook`, docs/official-formats.md#lm-behaviour):
        RMSNorm([E1(id1) | E2(id2) | CLIP]) -> Linear, CLIP = 0 at BOI/EOI and when absent."""
        cfg = self.config
        ids_text, ids_vision = router.split(input_ids)
        text = self.embed_tokens(ids_text[:, 0]) if router.runs_text() else None
        vision = None
        if router.runs_vision():
            local = ids_vision - cfg.text_vocab_size
            discrete = torch.cat([table(local[:, c]) for c, table in enumerate(self.vision_embed_tokens)], dim=-1)
            if clip_features is None:
                signal = discrete.new_zeros(local.shape[0], cfg.contiguous_signal_size)
            else:
                signal = router.split(clip_features)[1].to(discrete.dtype)
                is_patch = (local[:, 0] < cfg.codebook_size)[:, None]
                signal = torch.where(is_patch, signal, torch.zeros_like(signal))
            vision = self.vision_contiguous_signal_processor(self.vision_signal_norm(torch.cat([discrete, signal], -1)))
        return router.merge(text, vision)

    def forward(self, x: torch.Tensor, ctx: _Context, checkpointing: bool = False) -> torch.Tensor:
        for layer in self.layers:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return ctx.router(x, self.norm, self.vision_norm)


class VisionHeads(nn.Module):
    """One Linear(D -> codebook_size + 2) per codebook (official `vision_lm_head.heads`)."""

    def __init__(self, config: LibraConfig):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(config.hidden_size, config.vision_vocab_size, bias=False) for _ in range(config.num_codebooks)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, num_codebooks, vision_vocab)."""
        return torch.stack([head(h) for head in self.heads], dim=1)


class LibraForCausalLM(TrainableParameters, nn.Module):
    def __init__(self, config: LibraConfig | str, attn_backend: str = "auto"):
        super().__init__()
        if isinstance(config, str):
            config = LibraConfig.from_preset(config)
        self.config = config
        self.model = LibraModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.text_vocab_size, bias=False)
        self.vision_lm_head = VisionHeads(config)
        self.attn_backend = attn_backend
        # Recompute each decoder layer in the backward pass (activation checkpointing).
        self.gradient_checkpointing = False
        # Run both modalities' modules even when a batch lacks one (zero rows), so every
        # parameter gets a gradient each step: what DDP and FSDP2 training need.
        self.run_idle_modules = False
        # None, or a function called by every attention layer with (layer index, q (B, H, Nq, d),
        # k and k_x (B, H, Nk, d) after RoPE, cache included, key modality (B, Nk), key padding
        # mask (B, Nk) True = real, or None): an attention analysis reads the rows it needs
        # from them (libra_lm.visual.attention_maps), whatever backend computes the attention.
        self.attention_probe: Callable | None = None
        self._frozen_llm = False
        self.init_weights()

    # ---- construction and files ----------------------------------------------------------------
    def init_weights(self, modules: list[nn.Module] | None = None) -> None:
        """Official initialisation (`LibraPreTrainedModel._init_weights`) of `modules` (default: all)."""
        std = self.config.initializer_range
        for module in modules if modules is not None else self.modules():
            init_official_(module, std)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LibraForCausalLM":
        return cls(LibraConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_pickle: bool = False,
        **config_overrides,
    ) -> "LibraForCausalLM":
        """Load our folder (save_pretrained), an official Libra folder
        (docs/official-formats.md#lm-folder) or an HF LLaMA folder (vision parts initialised as
        the official init), or any of them by Hugging Face Hub id, e.g. "YifanXu/libra-11b-chat"
        (libra_tok.hub). `config_overrides` set LibraConfig fields an HF LLaMA config does not
        have (e.g. contiguous_signal_size)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype, trust_pickle=trust_pickle, **config_overrides)

    def save_pretrained(self, path: str | Path, *, image_tokenizer: dict | None = None, push_to_hub: bool = False,
                        repo_id: str | None = None, **push_options) -> Path:
        """Write config.json + model.safetensors (atomically); `image_tokenizer` records the
        identity of the image tokenizer the model was trained with (see checkpoint.save_pretrained).
        push_to_hub: then upload the folder with a model card to the Hub repo `repo_id`
        (libra_tok.hub_push.push_to_hub, which takes `push_options`)."""
        from .checkpoint import save_pretrained

        folder = save_pretrained(self, path, image_tokenizer=image_tokenizer)
        if push_to_hub:
            from libra_tok.hub_push import push_to_hub as push

            push(folder, repo_id, expect="lm", **push_options)
        return folder

    # ---- parameters ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def frozen_llm(self) -> bool:
        """True: only parameters whose name contains "vision" train (official pretraining,
        `frozen_language` in libra/configs/libra_pretrain.yaml: experts, vision norms, all four
        bridges, vision embeddings, signal norm/processor, vision heads). False: everything
        trains (instruction tuning)."""
        return self._frozen_llm

    @frozen_llm.setter
    def frozen_llm(self, value: bool) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(not value or "vision" in name)
        self._frozen_llm = bool(value)


    # ---- forward ---------------------------------------------------------------------------------
    def check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) joint ids, checked (`libra_lm.segments.check_joint_ids`: one host
        synchronisation); (B, N) text-only ids are duplicated into both columns."""
        return check_joint_ids(input_ids, self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        clip_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> LibraOutput:
        """input_ids (B, N, 2) joint ids; clip_features (B, N, C), read at image patches only;
        attention_mask (B, N) or, with a cache, (B, past + N): 1 = token, 0 = padding;
        labels like input_ids, -100 = ignored, shifted inside (t predicts t + 1);
        segment_ids (B, N): packed sequences (positions restart per segment unless
        position_ids are given); past_key_values/use_cache: incremental decoding;
        logits_to_keep: heads on the last k positions only (0 = all)."""
        input_ids = self.check_input_ids(input_ids)
        return self._forward(input_ids, clip_features, attention_mask, labels, position_ids=position_ids,
                             segment_ids=segment_ids, past_key_values=past_key_values, use_cache=use_cache,
                             logits_to_keep=logits_to_keep)

    def decode_step(self, input_ids: torch.Tensor, cache: KVCache, *, num_vision: int) -> LibraOutput:
        """One step of incremental decoding, without a host synchronisation: `input_ids`
        (B, n, num_codebooks) follow the cached positions and are taken as valid (the model's
        own samples: nothing is checked), `num_vision` of them are vision tokens (known on the
        host, it spares the router counting them on the device); the new tokens are real (no
        padding), and no CLIP features come with them (generated patches get none, as the
        official)."""
        return self._forward(as_joint_ids(input_ids, self.config), None, None, None, past_key_values=cache,
                             num_vision=num_vision)

    def _forward(
        self,
        input_ids: torch.Tensor,
        clip_features: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        num_vision: int | None = None,
    ) -> LibraOutput:
        """`forward` on ids already checked; `num_vision`: the number of vision tokens, when the
        caller knows it (then nothing here reads device values back to the host)."""
        cfg = self.config
        b, n, _ = input_ids.shape
        device = input_ids.device
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")
        if clip_features is not None and tuple(clip_features.shape) != (b, n, cfg.contiguous_signal_size):
            raise ValueError(f"clip_features must be (B, N, C) = ({b}, {n}, {cfg.contiguous_signal_size}), "
                             f"got {tuple(clip_features.shape)}")

        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(cfg.num_hidden_layers)
        past = cache.length if cache is not None else 0
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")

        is_vision = input_ids[..., 0] >= cfg.text_vocab_size
        key_is_vision = is_vision if past == 0 else torch.cat([cache.is_vision, is_vision], 1)
        key_mask = key_padding_mask(attention_mask, cache, b, n, past, device)
        if attention_mask is None:  # the new tokens are real: padding only where the cache has some
            has_padding = past > 0 and cache.has_padding
        else:
            has_padding = bool((~key_mask).any())

        if position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids)
            elif has_padding:
                position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + n, device=device).expand(b, n)
        if tuple(position_ids.shape) != (b, n):
            raise ValueError(f"position_ids must be (B, N) = ({b}, {n}), got {tuple(position_ids.shape)}")

        router = Router(is_vision, run_idle=self.run_idle_modules, num_vision=num_vision)
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = rope_cos_sin(position_ids.to(device), cfg.head_dim, cfg.rope_theta, dtype)
        backend = self.attn_backend
        if past > 0 and backend in ("cuda", "flex"):
            backend = "auto"  # the fused kernels take Nq == Nk; decoding steps use sdpa
        ctx = _Context(
            router=router, cos=cos, sin=sin, key_is_vision=key_is_vision, segment_ids=segment_ids,
            key_padding_mask=key_mask if has_padding else None, backend=backend, cache=cache,
            layout_cache=_layout_hints(router, n), probe=self.attention_probe,
        )
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and cache is not None:
            raise ValueError("gradient checkpointing is for training; call without use_cache/past_key_values")

        x = self.model.embed(input_ids, clip_features, router)
        hidden = self.model(x, ctx, checkpointing=checkpointing)
        if cache is not None:
            cache.advance(key_is_vision, key_mask, has_padding)

        if logits_to_keep and logits_to_keep < n:
            head_router = Router(is_vision[:, -logits_to_keep:], run_idle=self.run_idle_modules)
            text_logits, vision_logits = self._heads(hidden[:, -logits_to_keep:], head_router)
        else:
            text_logits, vision_logits = self._heads(hidden, router)
        loss = per = None
        if labels is not None:
            if logits_to_keep and logits_to_keep < n:
                raise ValueError("labels need logits at every position; leave logits_to_keep at 0")
            per, valid = self.token_losses(text_logits, vision_logits, labels, is_vision)
            loss = self._official_mean(per, valid)
        return LibraOutput(loss, text_logits, vision_logits, hidden, cache, per)

    def _heads(self, hidden: torch.Tensor, router: Router) -> tuple[torch.Tensor, torch.Tensor]:
        """Text head on text positions, the vision heads on vision positions; -inf elsewhere
        (the official joint logit layout, docs/official-formats.md#lm-behaviour)."""
        cfg = self.config
        b, n, _ = hidden.shape
        if not router.run_idle and router.num_vision == 0:  # text only: no scatter of the large logits
            shape = (b, n, cfg.num_codebooks, cfg.vision_vocab_size)
            vision = hidden.new_full(shape, float("-inf"), dtype=torch.float32)
            return self.lm_head(hidden).float(), vision
        h_text, h_vision = router.split(hidden)
        text = hidden.new_full((b * n, cfg.text_vocab_size), float("-inf"), dtype=torch.float32)
        vision = hidden.new_full((b * n, cfg.num_codebooks, cfg.vision_vocab_size), float("-inf"), dtype=torch.float32)
        if router.runs_text():
            text = text.index_copy(0, router.text_index, self.lm_head(h_text).float())
        if router.runs_vision():
            vision = vision.index_copy(0, router.vision_index, self.vision_lm_head(h_vision).float())
        return text.view(b, n, -1), vision.view(b, n, cfg.num_codebooks, -1)

    def token_losses(
        self, text_logits: torch.Tensor, vision_logits: torch.Tensor, labels: torch.Tensor, is_vision: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of every label, (B, N-1, codebooks), 0 where ignored, and the mask of
        the labels that count. Position t predicts t + 1. A position's logits are finite only for
        its own modality (the official joint [text | vision] layout), so the joint
        log-softmax equals the log-softmax over that modality's logits; a label of the other
        modality would have probability 0 and is rejected. A text position predicts one text
        token, so its cross-entropy is computed once and counted in every codebook."""
        cfg = self.config
        ncb, v_t = cfg.num_codebooks, cfg.text_vocab_size
        if labels.ndim == 2:
            labels = labels[..., None].expand(*labels.shape, ncb)
        if tuple(labels.shape) != (*is_vision.shape, ncb):
            raise ValueError(f"labels must have the shape of input_ids {(*is_vision.shape, ncb)}, "
                             f"got {tuple(labels.shape)}")
        labels = labels[:, 1:].to(text_logits.device).long()
        valid = labels != IGNORE_INDEX
        source_vision = is_vision[:, :-1, None]
        text_rows, vision_rows = valid.any(-1) & ~source_vision[..., 0], valid.any(-1) & source_vision[..., 0]
        text_labels = torch.where(valid, labels, labels.max(-1, keepdim=True).values)  # a row's one text label
        bad = torch.stack([
            (valid & ~source_vision & ((labels < 0) | (labels >= v_t))).any(),
            (valid & source_vision & ((labels < v_t) | (labels >= v_t + cfg.vision_vocab_size))).any(),
            (text_rows[..., None] & (text_labels != text_labels[..., :1])).any(),
        ]).tolist()
        if bad[0] or bad[1]:
            raise ValueError(
                "labels ask a position to predict a token of the other modality (or an id out of range): "
                "text positions predict text ids, vision positions vision ids. Mask such labels with -100 "
                "as the official pipeline does (BOI after text, the first text token after EOI)."
            )
        if bad[2]:
            raise ValueError("a text position's labels must name the same text token in every codebook column")
        per = text_logits.new_zeros(labels.shape)
        if not bool(source_vision.any()):
            # Text only: every row has finite text logits, no gather of the (large) logits needed.
            target = torch.where(text_rows, text_labels[..., 0], IGNORE_INDEX).reshape(-1)
            ce = F.cross_entropy(text_logits[:, :-1].reshape(-1, v_t), target, reduction="none")
            per = per + ce.view(text_rows.shape)[..., None]
        else:  # (possibly zero rows: the heads stay in the graph, as run_idle_modules needs)
            ce = F.cross_entropy(text_logits[:, :-1][text_rows], text_labels[..., 0][text_rows], reduction="none")
            per = per.index_put((text_rows,), ce[:, None].expand(-1, ncb))
        target = torch.where(valid, labels - v_t, IGNORE_INDEX)[vision_rows]  # (n, codebooks)
        logits = vision_logits[:, :-1][vision_rows]  # (n, codebooks, vision vocab)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        per = per.index_put((vision_rows,), ce.view(-1, ncb))
        return per * valid, valid

    def loss(
        self, text_logits: torch.Tensor, vision_logits: torch.Tensor, labels: torch.Tensor, is_vision: torch.Tensor
    ) -> torch.Tensor:
        """Official loss (`LibraForCausalLM.forward`, docs/official-formats.md#lm-behaviour): per
        codebook, the mean cross-entropy over its
        non-ignored labels in the joint logit space; then the mean over codebooks. A batch
        without labels gives 0 (the official mean would be NaN)."""
        per, valid = self.token_losses(text_logits, vision_logits, labels, is_vision)
        return self._official_mean(per, valid)

    @staticmethod
    def _official_mean(per: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return (per.sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)).mean()


def _layout_hints(router: Router, n: int) -> dict:
    """A layout cache for the attention calls of one pass, seeded with what the router already
    knows on the host: the most vision and text queries a row has (saves the sdpa plan a
    synchronisation when one modality is absent, or in one-token decoding steps)."""
    if router.num_vision == 0:
        return {"query_counts": (0, n)}
    if router.num_text == 0:
        return {"query_counts": (n, 0)}
    if n == 1:
        return {"query_counts": (1, 1)}
    return {}


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 where the segment id changes (packed sequences)."""
    b, n = segment_ids.shape
    idx = torch.arange(n, device=segment_ids.device).expand(b, n)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_of = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    return idx - start_of


__all__ = ["LibraForCausalLM", "LibraModel", "LibraOutput", "KVCache", "IGNORE_INDEX", "rope_cos_sin", "apply_rope",
           "key_padding_mask", "segment_positions", "TrainableParameters"]
