"""HoVLE's three training stages (paper §3.2) and their default hyper-parameters, read by the
options of `libra-lm train` (libra_lm.train.TrainConfig) when `arch` is "hovle".

    distill  stage 1: the module regresses a frozen teacher on unpaired images and text (negative
             cosine similarity); the LLM is frozen and not run
    align    stage 2: next-token prediction on image-caption pairs; the LLM is frozen
    sft      stage 3: LLaVA-format conversations; everything trains

The defaults are Libra's (libra_lm.train.STAGE_DEFAULTS: pretraining values for the two shard
stages, instruction-tuning values for sft), so that a comparison differs in the design only.
"""

from __future__ import annotations

from typing import Any

ARCHS = ("libra", "hovle")
HOVLE_STAGES = ("distill", "align", "sft")
HOVLE_SHARD_STAGES = ("distill", "align")  # stages whose data are shard folders
HOVLE_FROZEN_LLM = {"distill": True, "align": True, "sft": False}
HOVLE_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "distill": {"lr": 1e-4, "batch_size": 8, "grad_accum": 4, "max_length": 700, "steps": None},
    "align": {"lr": 1e-4, "batch_size": 8, "grad_accum": 4, "max_length": 700, "steps": None},
    "sft": {"lr": 2e-5, "batch_size": 2, "grad_accum": 8, "max_length": 2048, "steps": None},
}
TEACHERS = ("auto", "linear")  # or the folder / Hub id of a Libra model

__all__ = ["ARCHS", "HOVLE_STAGES", "HOVLE_SHARD_STAGES", "HOVLE_FROZEN_LLM", "HOVLE_STAGE_DEFAULTS", "TEACHERS"]
