"""LM training data: official caption processing and label masks, LLaVA conversations, shard
lookup, feature sources, padding and packing, worker processes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from builders import CAPTIONS, SMALL, TINY
from libra_lm.data import (
    Collator,
    Example,
    ImageLookup,
    ImageSlot,
    InstructionDataset,
    PretrainDataset,
    ShardImages,
    collate,
    conversation_example,
    iter_texts,
    pack_rows,
    parse_conversation,
    preprocess_caption,
    pretrain_example,
    truncate,
)
from libra_lm.generate import build_prompt
from libra_lm.segments import image_segment

V = TINY.text_vocab_size  # 320: vision id c is V + c, BOI V + 512, EOI V + 513
BOI, EOI, X = V + 512, V + 513, -100

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- captions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("A Photo of a CAT", "a photo of a cat"),
    ("stars ** and ## hashes ~~ tildes", "stars and hashes tildes"),  # *#~ -> space, runs collapse
    ("a*b#c~d", "a b c d"),
    ("  padded\t\tcaption \n", "padded caption"),
    ("line\nbreak", "line\nbreak"),  # a single newline is not a run of 2
    ("Punctuation, stays! (yes)", "punctuation, stays! (yes)"),  # unlike BLIP's pre_caption
    ("<b>Bold</b> HTML is kept", "<b>bold</b> html is kept"),  # official remove_html: False
])
def test_caption_preprocessing(raw, expected):
    assert preprocess_caption(raw) == expected


def test_caption_word_limit_and_html_option():
    words = [f"w{i}" for i in range(70)]
    assert preprocess_caption(" ".join(words)) == " ".join(words[:64])
    assert preprocess_caption(" ".join(words), max_words=3) == "w0 w1 w2"
    assert preprocess_caption("<i>Tag</i> gone", remove_html=True) == "tag gone"
    assert preprocess_caption("Keep Case", lowercase=False) == "Keep Case"


# ---- label masks written out ----------------------------------------------------------------------------
def test_pretrain_layout_and_labels_by_hand(text_tok):
    image_ids = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])
    ex = pretrain_example(image_ids, "a photo", text_tok, SMALL)
    caption = ex.ids[8:, 0].tolist()
    # "\n" then the caption without SentencePiece's dummy prefix ("a", not "▁a"), as after an image.
    assert text_tok.sp.id_to_piece(caption[0]) == "a" and text_tok.decode(caption) == "a photo"
    col0 = [1, BOI, V + 5, V + 7, V + 9, V + 11, EOI, 13, *caption]
    col1 = [1, BOI, V + 6, V + 8, V + 10, V + 12, EOI, 13, *caption]
    assert ex.ids.tolist() == [list(p) for p in zip(col0, col1, strict=True)]
    # BOS, BOI and the newline masked; patches, EOI and the caption trained; no EOS.
    lab0 = [X, X, V + 5, V + 7, V + 9, V + 11, EOI, X, *caption]
    lab1 = [X, X, V + 6, V + 8, V + 10, V + 12, EOI, X, *caption]
    assert ex.labels.tolist() == [list(p) for p in zip(lab0, lab1, strict=True)]
    assert [s.start for s in ex.images] == [2]
    with_eos = pretrain_example(image_ids, "a photo", text_tok, SMALL, eos=True)
    assert with_eos.ids[-1].tolist() == [2, 2] and with_eos.labels[-1].tolist() == [2, 2]


def test_instruction_labels_by_hand(text_tok):
    rounds = [("hi", "a cat"), ("more", "no")]
    ex = conversation_example(rounds, text_tok, SMALL, system="S")
    enc = text_tok.encode
    p1, a1 = enc("S USER: hi ASSISTANT:", bos=True), enc("a cat")
    p2, a2 = enc("USER: more ASSISTANT:"), enc("no")
    assert ex.ids[:, 0].tolist() == p1 + a1 + [2] + p2 + a2 + [2]
    assert (ex.ids[:, 0] == ex.ids[:, 1]).all()
    assert ex.labels[:, 0].tolist() == [X] * len(p1) + a1 + [2] + [X] * len(p2) + a2 + [2]
    assert text_tok.decode(a1) == "a cat" and text_tok.sp.id_to_piece(a1[0]).startswith("\u2581")


def test_instruction_with_image_masks_everything_but_answers(text_tok):
    image_ids = torch.arange(8).view(4, 2)
    rounds, image_round = parse_conversation([
        {"from": "human", "value": "What is this?\n<image>"},
        {"from": "gpt", "value": "A red ball."},
        {"from": "human", "value": "And the colour?"},
        {"from": "gpt", "value": "Red."},
    ])
    ex = conversation_example(rounds, text_tok, SMALL, image_ids=image_ids, image_round=image_round)
    trained = ex.labels[:, 0] != X
    assert text_tok.decode(ex.ids[trained, 0].tolist()) == "A red ball. Red."
    assert ex.ids[trained, 0].tolist().count(2) == 2  # each answer ends with EOS, which is trained
    # Every image position (BOI, patches, EOI) is masked; the image comes first in its turn.
    image_span = (ex.ids[:, 0] >= V)
    assert int(image_span.sum()) == 6 and not trained[image_span].any()
    # The first round's prompt is exactly what generation builds for this question.
    prompt = build_prompt(text_tok, SMALL, "What is this?", image=image_segment(image_ids, None, SMALL))
    assert torch.equal(ex.ids[: prompt.ids.shape[0]], prompt.ids)
    assert not trained[: prompt.ids.shape[0]].any() and trained[prompt.ids.shape[0]]
    assert ex.images[0].start == int(image_span.nonzero()[0]) + 1


def test_parse_conversation_rules():
    rounds, image_round = parse_conversation([
        {"from": "gpt", "value": "skipped greeting"},
        {"from": "human", "value": "<image>\n Describe it. "},
        {"from": "gpt", "value": " A dog. "},
        {"from": "human", "value": "Thanks"},
    ])
    assert rounds == [("Describe it.", "A dog."), ("Thanks", None)] and image_round == 0
    with pytest.raises(ValueError, match="turn 1 is from 'human', expected 'gpt'"):
        parse_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "x")
    with pytest.raises(ValueError, match="more than one <image>"):
        parse_conversation([{"from": "human", "value": "<image> <image>"}])
    with pytest.raises(ValueError, match="<image> in an answer"):
        parse_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}])
    with pytest.raises(ValueError, match="non-empty list"):
        parse_conversation([])


def test_truncation_never_cuts_an_image(text_tok):
    image_ids = torch.zeros(4, 2, dtype=torch.long)
    ex = pretrain_example(image_ids, "a cat on a red sofa", text_tok, SMALL)
    assert len(truncate(ex, 8, SMALL)) == 8 and truncate(ex, 8, SMALL).images  # cut after EOI: image kept
    cut = truncate(ex, 5, SMALL)  # would end inside the image: ends before BOI instead
    assert cut.ids[:, 0].tolist() == [1] and cut.images == []
    assert truncate(ex, 100, SMALL) is ex


# ---- batches ------------------------------------------------------------------------------------------
def _example(n: int, first: int) -> Example:
    ids = torch.arange(first, first + n)[:, None].expand(n, 2).clone()
    return Example(ids, ids.clone())


def test_padding_and_packing_layouts():
    examples = [_example(3, 10), _example(5, 20), _example(2, 30)]
    padded = collate(examples, TINY)
    assert padded.input_ids.shape == (3, 5, 2) and padded.segment_ids is None
    assert padded.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert padded.labels[0, 3:].eq(X).all() and padded.input_ids[0, 3:].eq(TINY.pad_token_id).all()
    assert padded.samples == [(0, 0, 3), (1, 0, 5), (2, 0, 2)] and padded.num_tokens == 10
    packed = collate(examples, TINY, pack=True, pack_length=6)
    # First fit: [3 + 2] in row 0, [5] in row 1.
    assert pack_rows([3, 5, 2], 6) == [[0, 2], [1]]
    assert packed.input_ids.shape == (2, 5, 2)
    assert packed.input_ids[0, :, 0].tolist() == [10, 11, 12, 30, 31]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert packed.samples == [(0, 0, 3), (1, 0, 5), (0, 3, 2)]
    with pytest.raises(ValueError, match="does not fit a packed row of 4"):
        collate(examples, TINY, pack=True, pack_length=4)


def test_features_and_pixels_go_to_their_slots():
    feats = torch.randn(TINY.num_image_tokens, TINY.contiguous_signal_size).half()
    a = Example(torch.zeros(70, 2, dtype=torch.long), torch.zeros(70, 2, dtype=torch.long), [ImageSlot(3, feats)])
    pixels = torch.randn(3, 112, 112)
    b = Example(torch.zeros(68, 2, dtype=torch.long), torch.zeros(68, 2, dtype=torch.long),
                [ImageSlot(2, None, pixels)])
    batch = collate([a, b], TINY, pack=True, pack_length=200)
    assert torch.equal(batch.clip_features[0, 3:67], feats.float())
    assert batch.clip_features[0, :3].eq(0).all() and batch.clip_features[0, 67:].eq(0).all()
    assert torch.equal(batch.pixels[0], pixels) and batch.pixel_slots == [(0, 70 + 2)]


# ---- shards -------------------------------------------------------------------------------------------
def test_image_lookup_by_path_suffix():
    lookup = ImageLookup(["/data/coco/train2017/1.jpg", "/data/vg/VG_100K/1.jpg", "/data/ocr/x.png",
                          "/data/a.tar/members/b.png"])
    assert lookup.find("coco/train2017/1.jpg") == (0, "")
    assert lookup.find("./VG_100K/1.jpg") == (1, "")
    assert lookup.find("x.png") == (2, "")
    assert lookup.find("members/b.png") == (3, "")
    assert lookup.find("1.jpg")[0] is None and "matches 2 shard samples" in lookup.find("1.jpg")[1]
    assert lookup.find("train2017/2.jpg") == (None, "image not in the shards")
    assert lookup.find("ain2017/1.jpg")[0] is None  # whole path components only


def test_shard_images_read_several_folders_through_one_reader(shard_dirs):
    both = ShardImages(list(shard_dirs))
    assert len(both) == 20 and both.shards.roots == list(shard_dirs)
    assert not both.has_features and both.needs_encoder  # the second folder stores no features
    assert np.array_equal(both.ids(13), both.ids(3)) and both.ids(3).dtype == np.int64
    assert both.meta(13) == both.meta(3) and list(both.iter_meta())[13] == both.meta(13)
    captioned = [bool(m.get("caption")) for m in both.iter_meta()]
    assert both.captioned.tolist() == captioned and sum(captioned) == 18
    with pytest.raises(IndexError, match="sample 20 out of range for 20 samples"):
        both.meta(20)


def test_pretrain_dataset_reads_shards(shard_dirs, sp, text_tok):
    with_feats, without = shard_dirs
    stored = ShardImages([with_feats])
    data = PretrainDataset(stored, sp, TINY)
    assert len(data) == 9 and list(data.skipped.values()) == ["no caption"]
    assert Path(next(iter(data.skipped))).name == "gravel.png"
    from libra_tok.shards import open_shards

    shards = open_shards(with_feats)
    for position in (0, 8):
        ex = data[position]
        sample = shards[data.indices[position]]
        assert torch.equal(ex.ids[2:2 + 64] - V, torch.from_numpy(sample.ids.astype(np.int64)))
        assert torch.equal(ex.images[0].features, torch.from_numpy(np.array(sample.features)))
        expected = preprocess_caption(sample.meta["caption"])
        assert text_tok.decode(ex.ids[ex.labels[:, 0] != X, 0].tolist()[65:]) == expected  # after 64 image ids + EOI
    # No stored features: the image comes back as pixels for the encoder; discrete: nothing.
    recompute = PretrainDataset(ShardImages([without]), sp, TINY)[0]
    assert recompute.images[0].features is None and recompute.images[0].pixels.shape == (3, 112, 112)
    discrete = PretrainDataset(ShardImages([with_feats], input_mode="discrete"), sp, TINY)[0]
    assert discrete.images[0].features is None and discrete.images[0].pixels is None
    assert ShardImages([without]).needs_encoder and not ShardImages([with_feats]).needs_encoder


def test_dataset_errors(shard_dirs, sp, tmp_path):
    with_feats, _ = shard_dirs
    with pytest.raises(ValueError, match="192 feature channels in the shards, contiguous_signal_size 96"):
        PretrainDataset(ShardImages([with_feats]), sp, TINY.replace(contiguous_signal_size=96))
    with pytest.raises(ValueError, match="64 patches per image in the shards, num_image_tokens 4"):
        PretrainDataset(ShardImages([with_feats]), sp, SMALL)
    images = ShardImages([with_feats])
    uncaptioned = [i for i, m in enumerate(images.iter_meta()) if "caption" not in m]
    with pytest.raises(ValueError, match="none of the 1 shard samples .* has a caption"):
        PretrainDataset(images, sp, TINY, indices=uncaptioned)
    with pytest.raises(ValueError, match="input mode must be one of"):
        ShardImages([with_feats], input_mode="continuous")
    moved = tmp_path / "moved"
    shutil.copytree(shard_dirs[1], moved)
    lines = (moved / "shard-00000" / "meta.jsonl").read_text().splitlines()
    broken = [json.dumps({**json.loads(line), "source": "/nowhere/x.png"}) for line in lines]
    (moved / "shard-00000" / "meta.jsonl").write_text("\n".join(broken) + "\n")
    with pytest.raises(ValueError, match="cannot be read to compute them .*--save-features.*--input discrete"):
        PretrainDataset(ShardImages([moved]), sp, TINY)[0]


def test_instruction_dataset_from_llava_json(shard_dirs, sp, text_tok, tmp_path):
    with_feats, _ = shard_dirs
    records = [
        {"id": "a", "image": "imgs/chelsea.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat animal?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
        {"id": "c", "image": "imgs/missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    images = ShardImages([with_feats])
    data = InstructionDataset([path], images, sp, TINY)
    assert len(data) == 2 and list(data.skipped.values()) == ["image not in the shards"]
    ex = data[0]
    index = next(i for i, m in enumerate(images.iter_meta()) if m["source"].endswith("chelsea.png"))
    start = ex.images[0].start
    assert torch.equal(ex.ids[start:start + 64] - V, torch.from_numpy(images.ids(index)))
    assert torch.equal(ex.images[0].features, images.image(index)[0])
    assert text_tok.decode(ex.ids[ex.labels[:, 0] != X, 0].tolist()) == "A cat."
    text_only = data[1]
    assert text_only.images == [] and text_tok.decode(text_only.ids[text_only.labels[:, 0] != X, 0].tolist()) == "Hi."
    with pytest.raises(ValueError, match="no image shards were given"):
        InstructionDataset([path], None, sp, TINY)
    (tmp_path / "bad.json").write_text("{\"not\": \"a list\"}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        InstructionDataset([tmp_path / "bad.json"], images, sp, TINY)


def test_worker_processes_give_the_same_batches(shard_dirs, sp):
    data = PretrainDataset(ShardImages([shard_dirs[0]]), sp, TINY)
    keys = [[(0, 1), (5, 2)], [(3, 3), (8, 4)]]
    batches = [list(DataLoader(data, batch_sampler=keys, num_workers=n, collate_fn=Collator(TINY, pack=True,
                                                                                          pack_length=300)))
               for n in (0, 2)]
    for a, b in zip(*batches, strict=True):
        for name in ("input_ids", "labels", "attention_mask", "segment_ids", "clip_features"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_texts_for_a_tokenizer(shard_dirs, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"file": "x.png", "caption": "jsonl caption"}\n\n')
    (tmp_path / "l.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                                     {"from": "gpt", "value": "A."}]}]))
    (tmp_path / "t.txt").write_text("plain text\n")
    texts = list(iter_texts([shard_dirs[0], tmp_path / "c.jsonl", tmp_path / "l.json", tmp_path / "t.txt"]))
    assert sorted(texts[:9]) == sorted(CAPTIONS.values())
    assert texts[9:] == ["jsonl caption", "Q?", "A.", "plain text\n"]
