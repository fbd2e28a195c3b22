"""Training data of the LM, from id shards (`libra-tok encode`) and LLaVA-style JSON: one module
per step of the data path.

    shards = ShardImages(["shards/"], input_mode="hybrid")                  # images.py
    data = PretrainDataset(shards, "tokenizer.model", LibraConfig.from_preset("tiny"))   # datasets.py
    batch = collate([data[0], data[1]], data.config)      # batching.py: input_ids (B, N, 2), labels, masks ...

    captions.py       the official caption processing and the pretraining sequence
    conversations.py  LLaVA JSON, its turns, the vicuna v1 sequence with answer-only labels
    examples.py       one sequence: joint ids, labels, image slots; truncation
    images.py         the LM's feature policy over the shard reader; image lookup by path
    datasets.py       PretrainDataset, InstructionDataset (worker-safe)
    t2i.py            text-to-image: caption first, then the image; labels on the image only
    batching.py       padding and packing into a Batch
    texts.py          texts for training a text tokenizer

Layouts (libra_lm.templates; docs/official-formats.md#lm-behaviour), joint ids (text ids in
both columns, image ids + V_t, BOI, EOI):
  pretraining   <s> BOI [patches] EOI \\n caption          (no EOS, as the official Libra-Base)
                labels: BOS, BOI and the "\\n" masked; patches, EOI and the caption trained.
  instruction   <s>{system} USER: BOI [patches] EOI \\n{question} ASSISTANT: {answer}</s>USER: ...
                labels: everything but the answers and their EOS masked (image included).
  text-to-image <s> caption \\n BOI [patches] EOI           labels: the patches and EOI only.
"""

from .batching import Batch, Collator, collate, pack_rows
from .captions import preprocess_caption, pretrain_example
from .conversations import IMAGE_TAG, ROLES, conversation_example, parse_conversation, records_of
from .datasets import MAX_LISTED, InstructionDataset, PretrainDataset
from .examples import Example, ImageSlot, truncate
from .images import INPUT_MODES, ImageLookup, ShardImages, check_images_fit
from .t2i import T2IDataset, t2i_example
from .texts import iter_texts

__all__ = [
    "INPUT_MODES",
    "IMAGE_TAG",
    "ROLES",
    "MAX_LISTED",
    "preprocess_caption",
    "ImageSlot",
    "Example",
    "truncate",
    "pretrain_example",
    "parse_conversation",
    "conversation_example",
    "ShardImages",
    "ImageLookup",
    "check_images_fit",
    "PretrainDataset",
    "InstructionDataset",
    "T2IDataset",
    "t2i_example",
    "records_of",
    "Batch",
    "pack_rows",
    "collate",
    "Collator",
    "iter_texts",
]
