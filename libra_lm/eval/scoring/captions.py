"""Caption metrics with pycocoevalcap, as its COCOEvalCap.evaluate computes them (pycocoevalcap/
eval.py): references and candidates through the Stanford PTB tokenizer (punctuation
removed, lower case), then BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D), and SPICE only when
asked (it downloads the Stanford CoreNLP models on first use). Scores are reported x100, as
the paper's tables print CIDEr.

The PTB tokenizer, METEOR and SPICE are Java programs: without a `java` on the PATH this is
an OSError that says how to install one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .common import check_complete

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = ("pycocoevalcap's PTB tokenizer and METEOR (and SPICE) run on Java 8 or newer: install a Java runtime "
             "(e.g. `apt-get install default-jre-headless`, or `conda install openjdk`) so that `java` is on the PATH")


class JavaNotFoundError(FileNotFoundError):
    """No `java` executable: the caption metrics cannot run."""


def check_caption_tools() -> None:
    """pycocoevalcap importable and `java` on the PATH, or an error that says what to install."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'libra[eval]' "
                          "(or pip install pycocoevalcap)") from exc
    if shutil.which("java") is None:
        raise JavaNotFoundError(f"java not found on the PATH: {JAVA_HINT}")


_shared: dict[str, Any] = {}


@contextmanager
def shared_meteor() -> Iterator[None]:
    """Within the block, caption scoring reuses one METEOR process: each start reads its
    paraphrase table, about ten seconds (the runner scores all caption tasks inside one)."""
    if _shared.get("active"):  # nested: the outer block owns the process
        yield
        return
    _shared["active"] = True
    try:
        yield
    finally:
        _shared.clear()  # the last reference: Meteor.__del__ stops the Java process


def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    if not _shared.get("active"):
        return Meteor()
    if "meteor" not in _shared:
        _shared["meteor"] = Meteor()
    return _shared["meteor"]


def score_captions(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str],
                   spice: bool = False) -> dict[str, Any]:
    """Corpus metrics of one candidate caption per image against its reference captions
    (both keyed by image id). Percentages; "count" is the number of images."""
    check_complete(references, candidates, "caption")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} image(s) have no reference caption (e.g. {empty[0]!r})")
    check_caption_tools()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in ids})
    res = tokenizer.tokenize({k: [{"caption": candidates[k]}] for k in ids})
    out: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)})
    out["METEOR"] = 100 * float(_meteor().compute_score(gts, res)[0])
    out["ROUGE_L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = 100 * float(Spice().compute_score(gts, res)[0])
    out["count"] = len(ids)
    return out


__all__ = ["METRICS", "JAVA_HINT", "JavaNotFoundError", "check_caption_tools", "shared_meteor", "score_captions"]
