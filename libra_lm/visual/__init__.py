"""Visual sequential modeling and attention analysis: what the paper shows of Libra's vision
system beyond benchmarks (§4.3, Fig. 3; §4.4, Fig. 4, Fig. 7).

    sampling.py        the decoding loop of image ids (vision heads, KV cache, classifier-free guidance)
    completion.py      image completion: keep the first rows of an image's ids, draw the rest
    t2i.py             text-to-image generation (the layout of `libra-lm train --stage t2i`)
    pictures.py        ids -> pictures through the image tokenizer; PNGs, grids, ids files
    attention_maps.py  the answer token's attention row (one row, any backend), Fig. 7's differences
    plots.py           difference curves and attention heatmaps (matplotlib)

Commands: `libra-lm complete-image`, `libra-lm generate-image`, `libra-lm attention` (docs/visual.md).
"""

from .attention_maps import (
    AnswerAttention,
    DifferenceAccumulator,
    answer_attention,
    attention_differences,
    last_token_attention,
    row_attention,
)
from .completion import complete_image, completion_prompt
from .sampling import grid_side, sample_image_ids
from .t2i import generate_images, t2i_prompt

__all__ = [
    "AnswerAttention",
    "DifferenceAccumulator",
    "answer_attention",
    "attention_differences",
    "last_token_attention",
    "row_attention",
    "complete_image",
    "completion_prompt",
    "grid_side",
    "sample_image_ids",
    "generate_images",
    "t2i_prompt",
]
