"""The SentencePiece wrapper and the tiny LLaMA-layout tokenizer trainer."""

import pytest

from builders import CORPUS
from libra_lm import LibraConfig, TextTokenizer, train_sentencepiece


def test_llama_layout_special_ids(text_tok):
    cfg = LibraConfig.from_preset("tiny")
    assert (text_tok.unk_token_id, text_tok.bos_token_id, text_tok.eos_token_id) == (0, 1, 2)
    assert text_tok.pad_token_id == cfg.pad_token_id == 0
    # Byte fallback puts byte b at id 3 + b, so "\n" (0x0A) is 13 as in LLaMA.
    assert text_tok.newline_token_id == 13 == cfg.newline_token_id
    assert text_tok.sp.id_to_piece(3 + ord("A")) == "<0x41>"
    assert 280 <= text_tok.vocab_size <= cfg.text_vocab_size


def test_encode_decode_round_trip(text_tok):
    text = "What is in the image?\nA cat, 42 birds & ünïcode ☃."
    ids = text_tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert 13 in ids  # the newline stays a byte piece
    assert text_tok.decode(ids) == text
    assert all(0 <= i < text_tok.vocab_size for i in ids)


def test_continuation_has_no_dummy_prefix(text_tok):
    # "\nWhat" after an image: the newline byte first, no lone "▁" piece before it.
    ids = text_tok.encode("\nWhat is it?", prefix_space=False)
    assert ids[0] == 13
    assert text_tok.decode(ids) == "\nWhat is it?"
    plain = text_tok.encode("\nWhat is it?")
    assert plain[1:] == ids and text_tok.sp.id_to_piece(plain[0]) == "\u2581"


def test_decode_skips_specials_and_image_ids(text_tok):
    ids = text_tok.encode("a cat")
    assert text_tok.decode([1, *ids, 0, 2, 32512, 5000]) == "a cat"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        TextTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="at least 260"):
        train_sentencepiece(CORPUS, tmp_path / "x.model", 100)
    with pytest.raises(ValueError, match="non-empty"):
        train_sentencepiece(["", "\n"], tmp_path / "x.model", 300)
