"""libra_tok: the Libra image tokenizer (frozen CLIP features, 2 x 9-bit LFQ, conv decoder)."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_official  # noqa: E402
from .config import PRESETS, TokenizerConfig  # noqa: E402
from .model import EncodeOutput, ImageTokenizer, TokenizerOutput  # noqa: E402

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
