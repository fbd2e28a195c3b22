"""HoVLE beside Libra: the monolithic baseline (a holistic embedding module in front of a plain
LLaMA), on the same LLaMA, shards, trainer and benchmarks (docs/hovle.md).

    config       HoVLEConfig, presets hovle-tiny and hovle-2.6b
    llama        the plain LLaMA decoder stack both stacks are made of
    embedding    patch embedding, pixel shuffle, the holistic embedding module
    model        HoVLEForCausalLM, its output and the two-stack KV cache
    checkpoint   folders, building on an LLM (HF LLaMA or Libra), the Libra teacher of stage 1
    data         raw pixels from the shards' sources, the stage datasets, batches
    stages       the three stages and their defaults (read by libra_lm.train's options)
    objectives   the stage-1 distillation loss
    generate     prompts with pixels, decoding with both caches
    trainer      `libra-lm train --arch hovle --stage distill|align|sft`
    compare      Libra vs HoVLE: loss curves on one plot, eval tables side by side
"""

from .config import PRESETS, HoVLEConfig
from .model import HoVLECache, HoVLEForCausalLM, HoVLEOutput

__all__ = ["HoVLEConfig", "PRESETS", "HoVLEForCausalLM", "HoVLEOutput", "HoVLECache"]
