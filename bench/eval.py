"""`libra-lm eval` throughput: questions/s of the batched harness vs one question at a time.

    python bench/eval.py                                   # tiny random model, POPE-style questions, CPU
    python bench/eval.py --config small                    # hidden 512, 4 layers, 32000-piece vocabulary
    python bench/eval.py --questions 128 --batch-sizes 1,8,32
    python bench/eval.py --model libra-11b-chat --trust-pickle --data-root bench-data --tasks pope --limit 200 \
        --device cuda

Every row runs the whole harness (libra_lm.eval.runner.run_eval: image tokenization, prompt
rendering, left-padded batched greedy decoding with a KV cache, answers written and flushed
per batch) into its own output folder; questions/s counts the generation loop only (model
loading and scoring excluded). The first batch size is the baseline; "same answers" compares
every answer with the baseline's.

Without --model, a random tiny Libra LM (the `tiny` preset with the tiny image tokenizer) and
POPE-format questions about the assets/ images are made in a temporary folder: every answer
runs to --max-new-tokens, so the rows compare decoding work of equal size.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libra_lm.eval.runner import EvalConfig, run_eval  # noqa: E402

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Is there a cat in the image? ASSISTANT: Yes, there is a cat on the sofa.",
    "Answer the question using a single word or phrase. No, there is no dog.",
] * 8


def lm_config(name: str):
    from libra_lm import LibraConfig

    tiny = LibraConfig.from_preset("tiny")
    if name == "tiny":
        return tiny
    # LLaMA-like widths (hidden 512, 4 layers) and the 32000-piece vocabulary, with the tiny image
    # tokenizer's image sizes (64 patches, 192 CLIP channels): decoding is compute-bound, not overhead.
    return tiny.replace(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376,
                        text_vocab_size=32000)


def synthetic(folder: Path, questions: int, config: str = "tiny") -> tuple[Path, Path]:
    """(a random model folder, a data root with POPE-format questions on assets/ images)."""
    from PIL import Image

    from libra_lm import LibraForCausalLM, train_sentencepiece
    from libra_tok.pipeline import load_tokenizer, tokenizer_identity

    model_dir = folder / "model"
    torch.manual_seed(0)
    model = LibraForCausalLM(lm_config(config))
    with torch.no_grad():  # random weights: EOS is rare, so every answer runs to the token limit
        for p in model.parameters():
            p.normal_(0, 0.3 if config == "tiny" else 0.02)
    model.save_pretrained(model_dir, image_tokenizer=tokenizer_identity(load_tokenizer(preset="tiny", device="cpu"),
                                                                         None))
    train_sentencepiece(CORPUS, model_dir / "tokenizer.model", 320)

    pope = folder / "data" / "pope"
    (pope / "val2014").mkdir(parents=True)
    assets = sorted(p for p in (ROOT / "assets").iterdir() if p.suffix in (".png", ".jpg"))
    for i, src in enumerate(assets):
        with Image.open(src) as im:
            im.convert("RGB").save(pope / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    objects = ["cat", "dog", "car", "tree", "person", "cup", "rocket", "star"]
    per_split = -(-questions // 3)
    for s, split in enumerate(("random", "popular", "adversarial")):
        lines = [json.dumps({"question_id": k + 1, "image": f"COCO_val2014_{k % len(assets):012d}.jpg",
                             "text": f"Is there a {objects[(k + s) % len(objects)]} in the image?",
                             "label": "yes" if (k + s) % 2 else "no"}) for k in range(per_split)]
        (pope / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return model_dir, folder / "data"


def answers(out: Path) -> dict[str, str]:
    rows = {}
    for path in sorted((out / "answers").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[f"{r['task']}:{r['question_id']}"] = r["answer"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="LM folder (default: a random tiny model)")
    ap.add_argument("--data-root", type=Path, default=None, help="benchmark folders (default: synthetic POPE)")
    ap.add_argument("--tasks", default="pope")
    ap.add_argument("--limit", type=int, default=None, help="questions per split (real data)")
    ap.add_argument("--questions", type=int, default=96, help="synthetic questions (without --data-root)")
    ap.add_argument("--config", choices=("tiny", "small"), default="tiny", help="the random model (without --model)")
    ap.add_argument("--batch-sizes", default="1,8,16", help="comma-separated; the first is the baseline")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--trust-pickle", action="store_true", help="an official folder's vqgan.ckpt is a pickle")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: tiny decoding steps run fastest on one thread, see "
                         "tests/conftest.py one_thread; 0 = torch's default)")
    args = ap.parse_args()
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="libra-bench-eval-"))
    try:
        model, data = args.model, args.data_root
        if model is None or data is None:
            model_s, data_s = synthetic(work / "synthetic", args.questions, args.config)
            model, data = model or model_s, data or data_s
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        rows, base = [], None
        for b in sizes:
            cfg = EvalConfig(model=model, tasks=args.tasks, data_root=data, out=work / f"b{b}", limit=args.limit,
                             batch_size=b, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
                             trust_pickle=args.trust_pickle, progress=False)
            result = run_eval(cfg)
            got = answers(result.out)
            base = base or got
            same = sum(got[k] == base[k] for k in base)
            rows.append((b, result.generated, result.seconds, result.generated / result.seconds, same, len(base)))
        what = args.model or f"random {args.config} model"
        print(f"# {what}, {platform.processor() or platform.machine()}, torch {torch.__version__}, device "
              f"{args.device}, {torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens}")
        print("| batch size | questions | seconds | questions/s | vs batch 1st | same answers |")
        print("|---|---|---|---|---|---|")
        for b, n, sec, qps, same, total in rows:
            print(f"| {b} | {n} | {sec:.1f} | {qps:.2f} | {qps / rows[0][3]:.2f}x | {same}/{total} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
