"""libra_tok: the Libra image tokenizer (frozen CLIP features, 2 x 9-bit LFQ, conv decoder)."""

from .checkpoint import load_official
from .config import PRESETS, TokenizerConfig
from .model import EncodeOutput, ImageTokenizer, TokenizerOutput
from .version import __version__
from .weight_files import CheckpointError

__all__ = [
    "__version__",
    "ImageTokenizer",
    "EncodeOutput",
    "TokenizerOutput",
    "TokenizerConfig",
    "PRESETS",
    "load_official",
    "CheckpointError",
]
