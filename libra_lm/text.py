"""The LLaMA SentencePiece text tokenizer, and a trainer for small models of the same kind.

    tok = TextTokenizer.from_pretrained("llama-2-7b-chat-hf/tokenizer.model")   # or its folder
    tok.encode("a photo", bos=True)      # [1, 263, 15373]
    tok.decode(ids)

LLaMA's model: unk 0 (also the pad id), bos 1, eos 2, then 256 byte-fallback pieces, so
"\n" is the byte piece <0x0A> = 13. `train_sentencepiece` writes models with that layout
(BPE, byte fallback, digits split, no normalisation), which the tests and the offline demo
use in place of the real 32000-piece model.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from libra_tok.fileio import atomic_write_bytes

from .config import LibraConfig

MODEL_FILE = "tokenizer.model"
_SPACE = "\u2581"  # SentencePiece's whitespace mark


def _spm():
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the text tokenizer needs the sentencepiece package: "
                          "pip install 'sentencepiece>=0.2'") from exc
    return sentencepiece


class TextTokenizer:
    def __init__(self, model_file: str | Path):
        path = Path(model_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist "
                                    f"(LLaMA folders ship it as {MODEL_FILE})")
        self.path = path
        self.sp = _spm().SentencePieceProcessor(model_file=str(path))
        self.vocab_size = int(self.sp.vocab_size())
        self.unk_token_id = int(self.sp.unk_id())
        self.bos_token_id = int(self.sp.bos_id())
        self.eos_token_id = int(self.sp.eos_id())
        # LLaMA has no pad piece; its pad id is unk (0), as the official tokenizer sets it.
        pad = int(self.sp.pad_id())
        self.pad_token_id = pad if pad >= 0 else self.unk_token_id
        newline = int(self.sp.piece_to_id("<0x0A>"))
        self.newline_token_id = newline if newline != self.unk_token_id else int(self.sp.piece_to_id("\n"))
        self._lone_space = int(self.sp.piece_to_id(_SPACE))
        self._special = {self.unk_token_id, self.bos_token_id, self.eos_token_id, self.pad_token_id}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TextTokenizer":
        """A tokenizer.model file, or a folder that contains one."""
        path = Path(path).expanduser()
        if path.is_dir():
            if not (path / MODEL_FILE).is_file():
                raise FileNotFoundError(f"{path} has no {MODEL_FILE}; pass the SentencePiece model file itself")
            path = path / MODEL_FILE
        return cls(path)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, prefix_space: bool = True) -> list[int]:
        """Token ids of `text`. prefix_space=False tokenizes `text` as the continuation of
        earlier text (no SentencePiece dummy prefix), e.g. "\\nquestion" after an image."""
        if prefix_space:
            ids = list(self.sp.encode(text))
        else:
            # Encode after a newline byte (which never merges) and drop what it produced.
            ids = list(self.sp.encode("\n" + text))
            if ids[:1] == [self._lone_space]:
                ids = ids[1:]
            ids = ids[1:] if ids[:1] == [self.newline_token_id] else ids
        return ([self.bos_token_id] if bos else []) + ids + ([self.eos_token_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special and out-of-vocabulary ids (e.g. image ids) are skipped."""
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special]
        return self.sp.decode(keep)

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_text_tokenizer(text_tokenizer: TextTokenizer, config: LibraConfig) -> None:
    """ValueError unless the tokenizer's pieces fit the LM's text vocabulary and its newline is
    the LM's (the newline after EOI is a rule of generation and of the training layouts)."""
    if text_tokenizer.vocab_size > config.text_vocab_size:
        raise ValueError(
            f"the text tokenizer has {text_tokenizer.vocab_size} pieces but the LM's text vocabulary is "
            f"{config.text_vocab_size}; use the tokenizer the model was trained with"
        )
    if text_tokenizer.newline_token_id != config.newline_token_id:
        raise ValueError(
            f"the text tokenizer's newline is id {text_tokenizer.newline_token_id}, the LM config says "
            f"{config.newline_token_id} (newline_token_id); use the model's own tokenizer"
        )


def train_sentencepiece(
    texts: Iterable[str], path: str | Path, vocab_size: int, *, model_type: str = "bpe"
) -> Path:
    """Train a LLaMA-layout SentencePiece model on `texts` and write it to `path` atomically.

    Layout as LLaMA's: unk 0, bos 1, eos 2, no pad piece, byte fallback (ids 3..258 are the
    bytes, so "\\n" = 13), digits split, no normalisation. Lines are the training sentences;
    newlines themselves stay byte pieces as in LLaMA. `vocab_size` is the target, reached
    when the texts hold enough distinct pieces (at least 259 + a few).
    """
    spm = _spm()
    lines: list[str] = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be at least 260 (3 specials + 256 bytes + pieces), got {vocab_size}")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["TextTokenizer", "check_text_tokenizer", "train_sentencepiece", "MODEL_FILE"]
