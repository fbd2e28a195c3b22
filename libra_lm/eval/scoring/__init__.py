"""The scorers: plain functions of ground truths and answer texts, one module per family of
official evaluation code (no model, no torch). See each module for the file it follows."""

from .captions import score_captions
from .choice import score_mmvp, score_scienceqa, score_seed
from .exact import score_gqa
from .mmbench import circular_accuracy, extract_choice
from .mme import score_mme
from .pope import score_pope
from .vqa import score_vqa, vqa_accuracy

__all__ = [
    "score_captions", "score_mmvp", "score_scienceqa", "score_seed", "score_gqa", "circular_accuracy",
    "extract_choice", "score_mme", "score_pope", "score_vqa", "vqa_accuracy",
]
