"""libra_lm: the Libra LM (LLaMA + routed visual expert + cross-modal bridge + hybrid image input)."""

__version__ = "0.1.0"

from .attention import bridged_attention  # noqa: E402
from .config import PRESETS, LibraConfig  # noqa: E402
from .model import KVCache, LibraForCausalLM, LibraOutput  # noqa: E402
from .text import TextTokenizer, train_sentencepiece  # noqa: E402

__all__ = [
    "__version__",
    "LibraConfig",
    "PRESETS",
    "LibraForCausalLM",
    "LibraOutput",
    "KVCache",
    "bridged_attention",
    "TextTokenizer",
    "train_sentencepiece",
]
