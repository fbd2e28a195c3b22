"""`libra-lm eval` (the paper's benchmarks with a model) and `libra-lm score` (the official rules
on answer files of any model)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail_on_errors
from .lm_options import execution_options, image_tokenizer_options, model_option, text_tokenizer_option

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
NORMALIZE_HELP = ("VQA answer normalisation: 'official' = the VQA API's vqaEval.py (answers normalised only when the "
                  "ten human answers differ); 'always' = the EvalAI / LLaVA-1.5 variant that normalises every "
                  "prediction first.")


@click.command("eval", context_settings=CONTEXT)
@model_option()
@click.option("--tasks", required=True,
              help="Comma-separated benchmarks: vqav2, vqav2_val, okvqa, gqa, vizwiz, vizwiz_val, scienceqa, nocaps, "
                   "flickr30k, coco, pope, mme, mmbench, mmbench_dev, mmbench_cn, mmbench_cn_dev, seed, mmvet, mmvp; "
                   "or table1 / table2 (the tasks of the paper's tables) / all.")
@click.option("--data-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding one sub-folder per benchmark in its official layout (docs/eval.md).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder: answers/<task>.jsonl, submissions/, results.json. Rerunning with the same "
                   "folder resumes (questions already answered are skipped).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N questions per split / subtask (whole MME pairs, MMBench circular groups and MMVP "
                   "pairs), for smoke runs. Default: every question.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Questions generated together (left-padded, one KV cache).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Cap every answer at N tokens instead of each task's protocol value (128 for short answers and "
                   "letters, 64 for captions, 1024 for MM-Vet).")
@click.option("--template", type=click.Choice(["vicuna_v1", "raw"]), default="vicuna_v1", show_default=True,
              help="Prompt layout: vicuna_v1 for chat models (Libra-Chat), raw for Libra-Base "
                   "(<s> image \\n question).")
@click.option("--normalize", type=click.Choice(["official", "always"]), default="official", show_default=True,
              help=NORMALIZE_HELP + " Also used for the VQAv2 submission file.")
@click.option("--spice", is_flag=True,
              help="Also compute SPICE for the caption tasks (downloads the Stanford CoreNLP models, about 1 GB, on "
                   "first use; needs 8 GB of Java heap).")
@click.option("--image-shards", "image_shards", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="libra-tok shard folder(s) (encoded with --save-features by the model's image tokenizer) to take "
                   "image ids and CLIP features from; images not found there are encoded. Repeatable.")
@click.option("--image-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per image-tokenizer call when encoding on the fly.")
@image_tokenizer_options
@text_tokenizer_option
@execution_options
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar with ETA.")
@fail_on_errors
def eval_command(model_path, tasks, data_root, out_dir, limit, batch_size, max_new_tokens, template, normalize,
                 spice, image_shards, image_batch_size, tokenizer_path, tokenizer_preset, text_tokenizer_path,
                 attn_backend, device, dtype, trust_pickle, progress) -> None:
    """Run the paper's benchmarks with a model and score them with the official rules.

    The benchmarks of Tables 1 and 2: greedy answers, questions rendered as LLaVA-1.5 does,
    the prompts of Table 6.

    Answers are appended to OUT/answers/<task>.jsonl batch by batch: an interrupted run loses
    at most one batch, and rerunning the same command continues where it stopped. Splits
    without public answers (vqav2, vizwiz, mmbench, mmbench_cn) are written to
    OUT/submissions/ as the official submission files; MM-Vet writes its answers file for its
    GPT-4 grader. At the end results.json is written and the table is printed in the paper's
    column order.
    """
    import logging

    from libra_lm.eval.runner import EvalConfig, run_eval

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = run_eval(EvalConfig(
        model=model_path, tasks=tasks, data_root=data_root, out=out_dir, limit=limit, batch_size=batch_size,
        max_new_tokens=max_new_tokens, template=template, normalize=normalize, spice=spice, device=device,
        dtype=dtype, attn_backend=attn_backend, tokenizer=tokenizer_path, tokenizer_preset=tokenizer_preset,
        text_tokenizer=text_tokenizer_path, image_shards=image_shards, image_batch_size=image_batch_size,
        trust_pickle=trust_pickle, progress=progress))
    rate = f" ({result.generated / result.seconds:.2f} questions/s)" if result.generated and result.seconds else ""
    click.echo(f"answered {result.generated} question(s){rate}; results: {result.out / 'results.json'}")
    for name, entry in result.results["tasks"].items():
        files = entry.get("files", [])
        if len(files) > 2:  # MME's per-subtask files
            click.echo(f"{name}: wrote {len(files)} files in {(result.out / files[0]).parent}")
        else:
            for path in files:
                click.echo(f"{name}: wrote {result.out / path}")
    click.echo("")
    click.echo(result.table)


# ---- score ----------------------------------------------------------------------------------------------
def _json_option(fn):
    return click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Also write the metrics to this JSON file.")(fn)


def _report(metrics: dict, json_out: Path | None, headline: list[str]) -> None:
    from libra_tok.fileio import atomic_write_json, check_output_file

    if json_out is not None:
        check_output_file(json_out, "--json")
        atomic_write_json(json_out, metrics)
    for key in headline:
        if key in metrics:
            click.echo(f"{key}: {metrics[key]:.2f}" if isinstance(metrics[key], float) else f"{key}: {metrics[key]}")
    unparsed = metrics.get("unparsed")
    if unparsed:
        click.echo(f"unparsed answers (counted wrong): {len(unparsed)}")
    if json_out is not None:
        click.echo(f"metrics written to {json_out}")


@click.group("score", context_settings=CONTEXT)
def score_group() -> None:
    """Score answer files of any model with the official rules of a benchmark (no model needed)."""


@score_group.command("vqa")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='VQA API annotations JSON ({"annotations": [{"question_id", "answers", ...}]}), e.g. '
                   "v2_mscoco_val2014_annotations.json or OK-VQA's mscoco_val2014_annotations.json.")
@click.option("--results", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Results JSON [{"question_id", "answer"}].')
@click.option("--questions", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="VQA API questions JSON: only its questions are scored (default: every annotated question).")
@click.option("--normalize", type=click.Choice(["official", "always"]), default="official", show_default=True,
              help=NORMALIZE_HELP)
@_json_option
@fail_on_errors
def score_vqa_command(annotations, results, questions, normalize, json_out) -> None:
    """VQA score (VQAv2, OK-VQA): min(#matching humans / 3, 1) over the leave-one-out subsets."""
    from libra_lm.eval.questions import qid_key
    from libra_lm.eval.scoring.vqa import score_vqa
    from libra_lm.eval.tasks.vqa import read_vqa_annotations, read_vqa_questions, read_vqa_results

    anns = read_vqa_annotations(annotations)
    if questions is not None:
        keep = {qid_key(q["question_id"]) for q in read_vqa_questions(questions)}
        anns = {k: v for k, v in anns.items() if k in keep}
    _report(score_vqa(anns, read_vqa_results(results), normalize), json_out, ["overall", "count"])


@score_group.command("vizwiz")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='VizWiz JSON with answers (val.json): [{"image", "question", "answers", "answer_type"}].')
@click.option("--results", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Results JSON [{"image", "answer"}].')
@_json_option
@fail_on_errors
def score_vizwiz_command(annotations, results, json_out) -> None:
    """VizWiz VQA score with its evaluator's rules ("unanswerable" is an answer like any other)."""
    from libra_lm.eval.questions import qid_key
    from libra_lm.eval.scoring.vqa import score_vqa
    from libra_lm.eval.tasks.vqa import read_vizwiz, read_vizwiz_results

    anns = {qid_key(r["image"]): {"answers": r["answers"], "answer_type": r.get("answer_type")}
            for r in read_vizwiz(annotations, True)}
    _report(score_vqa(anns, read_vizwiz_results(results), "vizwiz"), json_out, ["overall", "count"])


@score_group.command("pope")
@click.option("--questions", "question_files", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="POPE question JSON lines (coco_pope_random.json ...). Repeatable: one file per split, each "
                   "with its own answers file in the same order.")
@click.option("--answers", "answer_files", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Answer JSON lines {"question_id", "text"} (or "answer"), one file per --questions.')
@_json_option
@fail_on_errors
def score_pope_command(question_files, answer_files, json_out) -> None:
    """POPE F1 (and accuracy, precision, recall, yes-ratio) per split and their mean."""
    from libra_lm.eval.questions import qid_key, read_answer_lines
    from libra_lm.eval.scoring.pope import score_pope
    from libra_lm.eval.tasks.pope import read_pope_questions

    if len(question_files) != len(answer_files):
        raise click.UsageError("give one --answers file per --questions file")
    questions, answers = {}, {}
    for qf, af in zip(question_files, answer_files, strict=True):
        split = qf.stem.removeprefix("coco_pope_")
        for row in read_pope_questions(qf):
            questions[f"{split}:{qid_key(row['question_id'])}"] = {"label": row["label"], "split": split}
        answers.update({f"{split}:{k}": v for k, v in read_answer_lines(af).items()})
    _report(score_pope(questions, answers), json_out, ["f1", "accuracy", "precision", "recall", "yes_ratio", "count"])


@score_group.command("mme")
@click.option("--results-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The eval tool's results folder: <subtask>.txt files of 'image \\t question \\t ground truth \\t "
                   "prediction' lines.")
@_json_option
@fail_on_errors
def score_mme_command(results_dir, json_out) -> None:
    """MME scores (acc + acc+ per subtask; perception and cognition totals), as calculation.py."""
    from libra_lm.eval.scoring.mme import score_mme
    from libra_lm.eval.tasks.mme import read_mme_results

    _report(score_mme(read_mme_results(results_dir)), json_out, ["perception", "cognition"])


@score_group.command("caption")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='COCO-format caption annotations {"images": [...], "annotations": [{"image_id", "caption"}]}.')
@click.option("--results", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='COCO caption results [{"image_id", "caption"}], one caption per image.')
@click.option("--spice", is_flag=True, help="Also compute SPICE (downloads the Stanford CoreNLP models on first use).")
@_json_option
@fail_on_errors
def score_caption_command(annotations, results, spice, json_out) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) with pycocoevalcap; needs Java."""
    from libra_lm.eval.scoring.captions import METRICS, score_captions
    from libra_lm.eval.tasks.captions import read_coco_captions, read_coco_results

    _images, refs = read_coco_captions(annotations)
    _report(score_captions(refs, read_coco_results(results), spice=spice), json_out, [*METRICS, "SPICE", "count"])


@score_group.command("gqa")
@click.option("--questions", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GQA balanced questions JSON (testdev_balanced_questions.json).")
@click.option("--predictions", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='GQA predictions [{"questionId", "prediction"}].')
@_json_option
@fail_on_errors
def score_gqa_command(questions, predictions, json_out) -> None:
    """GQA exact-match accuracy (predictions lower-cased, trailing periods dropped)."""
    from libra_lm.eval.questions import qid_key
    from libra_lm.eval.scoring.exact import score_gqa
    from libra_lm.eval.tasks.vqa import read_gqa_predictions, read_gqa_questions

    qs = {qid_key(str(k)): {"answer": q["answer"], "types": q.get("types") or {}}
          for k, q in read_gqa_questions(questions).items()}
    _report(score_gqa(qs, read_gqa_predictions(predictions)), json_out, ["accuracy", "count"])


@score_group.command("mmbench")
@click.option("--questions", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="MMBench TSV with answers (a dev split), circular copies included.")
@click.option("--answers", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Answer JSON lines {"question_id" (the TSV index), "text"} (LLaVA\'s model_vqa_mmbench.py format; '
                   '"answer" also accepted).')
@_json_option
@fail_on_errors
def score_mmbench_command(questions, answers, json_out) -> None:
    """MMBench circular accuracy with choice extraction (no GPT judge)."""
    from libra_lm.eval.questions import qid_key, read_answer_lines
    from libra_lm.eval.scoring.common import check_complete
    from libra_lm.eval.scoring.mmbench import circular_accuracy
    from libra_lm.eval.tasks.choice import mmbench_reader

    qs = mmbench_reader(questions.name)(questions.parent)
    got = read_answer_lines(answers)
    check_complete({qid_key(q.qid): q for q in qs}, got, "MMBench")
    rows = [{"index": q.qid, "answer": q.answer, "prediction": got[qid_key(q.qid)], "choices": q.meta["choices"],
             "category": q.meta["row"].get("category"), "l2-category": q.meta["row"].get("l2-category")} for q in qs]
    if any(r["answer"] is None for r in rows):
        raise ValueError(f"{questions} has no answer column: a test split is scored by the MMBench server")
    metrics = circular_accuracy(rows)
    _report(metrics, json_out, ["circular_accuracy", "vanilla_accuracy", "questions"])


def _answers_for(questions: list, answers_file: Path, ignore: set[str]) -> dict[str, str]:
    """The answers of an answers file to `questions`; answers to the benchmark's questions that
    are not scored (`ignore`: text-only or video ones, which LLaVA's scripts also ask) are left
    out, any other unknown id stays (and is an error of the scorer)."""
    from libra_lm.eval.questions import qid_key, read_answer_lines

    known = {qid_key(q.qid) for q in questions}
    return {k: v for k, v in read_answer_lines(answers_file).items() if k in known or k not in ignore}


@score_group.command("scienceqa")
@click.option("--base-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="ScienceQA folder with problems.json and pid_splits.json.")
@click.option("--answers", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Answer JSON lines {"question_id" (the problem id), "text"}; answers to text-only problems are '
                   "left out (the IMG subset is scored).")
@_json_option
@fail_on_errors
def score_scienceqa_command(base_dir, answers, json_out) -> None:
    """ScienceQA IMG test accuracy with LLaVA's eval_science_qa.py letter rules."""
    from libra_lm.eval.questions import qid_key, read_json
    from libra_lm.eval.scoring.choice import score_scienceqa
    from libra_lm.eval.tasks.choice import SQA_FORMAT, scienceqa_reader

    qs = scienceqa_reader("test")(base_dir)
    problems = read_json(base_dir / "problems.json", SQA_FORMAT)
    text_only = {qid_key(pid) for pid, p in problems.items() if isinstance(p, dict) and not p.get("image")}
    got = _answers_for(qs, answers, text_only)
    _report(score_scienceqa({qid_key(q.qid): q.answer for q in qs}, got), json_out, ["accuracy", "count"])


@score_group.command("seed")
@click.option("--questions", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SEED-Bench.json (its image questions are scored).")
@click.option("--answers", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Answer JSON lines {"question_id", "text"}; answers to video questions are left out.')
@_json_option
@fail_on_errors
def score_seed_command(questions, answers, json_out) -> None:
    """SEED-Bench image accuracy: the answer must be exactly the right letter."""
    from libra_lm.eval.questions import qid_key
    from libra_lm.eval.scoring.choice import score_seed
    from libra_lm.eval.tasks.choice import read_seed, seed_reader

    rows, _ = read_seed(questions)
    video = {qid_key(r["question_id"]) for r in rows if r["data_type"] != "image"}
    qs = seed_reader(questions.name)(questions.parent)
    got = _answers_for(qs, answers, video)
    _report(score_seed({qid_key(q.qid): q.answer for q in qs}, got), json_out, ["accuracy", "count"])


@score_group.command("mmvp")
@click.option("--questions", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='MMVP Questions.csv ("Index", "Question", "Options", "Correct Answer").')
@click.option("--answers", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Answer JSON lines {"question_id" (the Index), "text"}.')
@_json_option
@fail_on_errors
def score_mmvp_command(questions, answers, json_out) -> None:
    """MMVP pair accuracy, the option of each answer found without a GPT grader."""
    from libra_lm.eval.questions import qid_key, read_answer_lines
    from libra_lm.eval.scoring.choice import score_mmvp
    from libra_lm.eval.tasks.choice import mmvp_reader

    qs = mmvp_reader(questions.name)(questions.parent)
    _report(score_mmvp({qid_key(q.qid): q.answer for q in qs}, read_answer_lines(answers)), json_out,
            ["pair_accuracy", "accuracy", "pairs"])


__all__ = ["eval_command", "score_group"]
