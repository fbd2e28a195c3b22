"""One template for training and generation: a prompt is, token for token, the start of the
training sequence of the same conversation."""

import pytest
import torch

from builders import SMALL
from libra_lm.data import conversation_example, pretrain_example
from libra_lm.generate import build_prompt
from libra_lm.segments import image_segment
from libra_lm.templates import IMAGE, VICUNA_V1_SYSTEM, Part, encode_parts, raw, vicuna_v1

IMAGE_IDS = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12]])


@pytest.mark.parametrize("question", ["What is in the image?", "Describe it in detail.", ""])
@pytest.mark.parametrize("with_image", [True, False])
def test_a_prompt_is_the_start_of_its_training_sequence(text_tok, question, with_image):
    image = image_segment(IMAGE_IDS, None, SMALL) if with_image else None
    prompt = build_prompt(text_tok, SMALL, question, image=image)
    rounds = [(question, "A red ball."), ("And the colour?", "Red.")]
    example = conversation_example(rounds, text_tok, SMALL, image_ids=IMAGE_IDS if with_image else None,
                                   image_round=0 if with_image else None)
    n = prompt.ids.shape[0]
    assert torch.equal(example.ids[:n], prompt.ids)
    # The prompt is all context; the answer starts right after it.
    assert (example.labels[:n] == -100).all() and (example.labels[n] != -100).all()
    answer = text_tok.encode("A red ball.", eos=True)
    assert example.ids[n:n + len(answer), 0].tolist() == answer


def test_a_follow_up_prompt_is_the_start_of_its_training_sequence(text_tok):
    """A second round: the parts of a prompt with the first round answered."""
    image = image_segment(IMAGE_IDS, None, SMALL)
    parts = vicuna_v1([("What is it?", "A ball."), ("Which colour?", None)], image_round=0)
    prompt = torch.cat([s.ids for _, s in encode_parts(parts, text_tok, SMALL, image)])
    example = conversation_example([("What is it?", "A ball."), ("Which colour?", "Red.")], text_tok, SMALL,
                                   image_ids=IMAGE_IDS, image_round=0)
    assert torch.equal(example.ids[: prompt.shape[0]], prompt)
    assert text_tok.decode(example.ids[prompt.shape[0]:, 0].tolist()) == "Red."


def test_the_raw_prompt_is_the_pretraining_sequence(text_tok):
    image = image_segment(IMAGE_IDS, None, SMALL)
    prompt = build_prompt(text_tok, SMALL, "a photo of a cat", image=image, template="raw")
    example = pretrain_example(IMAGE_IDS, "a photo of a cat", text_tok, SMALL)
    assert torch.equal(example.ids, prompt.ids)
    # Without text after the image, a raw prompt stops at EOI.
    bare = build_prompt(text_tok, SMALL, "", image=image, template="raw")
    assert torch.equal(bare.ids, example.ids[: 1 + SMALL.image_length])


def test_template_parts():
    assert vicuna_v1([("q", "a")], image_round=0, system="S") == [
        Part("S USER:", bos=True), IMAGE, Part("\nq ASSISTANT:", continues=True), Part("a", eos=True, answer=True)]
    # A turn that is only the image: no newline after it (the official preprocess_multimodal strips it).
    assert vicuna_v1([("", None)], image_round=0)[2] == Part(" ASSISTANT:", continues=True)
    assert vicuna_v1([("q", None)])[0] == Part(f"{VICUNA_V1_SYSTEM} USER: q ASSISTANT:", bos=True)
    assert raw("q", with_image=False) == [Part("q", bos=True)]
    assert raw("c", with_image=True, answer=True, eos=True) == [
        Part("", bos=True), IMAGE, Part("\nc", continues=True, eos=True, answer=True)]
    with pytest.raises(ValueError, match="no image was given"):
        encode_parts([IMAGE], None, SMALL)
