"""`libra-lm eval` end to end with the tiny model on small copies of every benchmark (made from
assets/ by tests/fixtures_eval.py): answers of every task, a run killed mid-way and resumed
giving the same answers and results as an uninterrupted one, ground-truth answers scoring
perfectly through every reader and scorer, the LLaVA-1.5 rendering, image shards, clear
errors for bad inputs, and `libra-lm score` on the files the harness writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures_eval import bench_root, tiny_model  # noqa: F401  (fixtures)

from builders import ROOT, cli_error
from libra_cli.lm import main
from libra_lm.eval import runner as eval_runner
from libra_lm.eval.answers import AnswerLog
from libra_lm.eval.questions import Question, qid_key
from libra_lm.eval.results import paper_table
from libra_lm.eval.runner import EvalConfig, run_eval
from libra_lm.eval.tasks import TASKS, get_tasks, limit_questions

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--max-new-tokens", "4", "--batch-size", "3", "--device", "cpu", "--no-progress"]
# The caption metrics run on Java; without it the caption tasks are left out (test_eval_scoring.py
# checks that the error names the missing java).
CAPTIONS = ("nocaps", "flickr30k", "coco")
HAS_JAVA = shutil.which("java") is not None
RUN_TASKS = [name for name in TASKS if HAS_JAVA or name not in CAPTIONS]


def config(model, data, out, tasks=RUN_TASKS, **kw) -> EvalConfig:
    return EvalConfig(model=model, tasks=tasks, data_root=data, out=out, max_new_tokens=4, batch_size=3, device="cpu",
                      progress=False, **kw)


def answer_lines(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / "answers" / f"{task}.jsonl").read_text().splitlines()]


def by_id(lines: list[dict]) -> dict[str, dict]:
    ids = [qid_key(r["question_id"]) for r in lines]
    assert len(ids) == len(set(ids)), "a question is answered twice"
    return dict(zip(ids, lines, strict=True))


@pytest.fixture(scope="module")
def full_run(tiny_model, bench_root, tmp_path_factory):  # noqa: F811
    """Every task, uninterrupted."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full") / "out"
    return run_eval(config(tiny_model, bench_root, out))


# ---- the whole harness ----------------------------------------------------------------------------------
def test_every_task_is_answered_scored_or_written(full_run):
    results = full_run.results["tasks"]
    assert list(results) == RUN_TASKS
    for name in RUN_TASKS:
        task = TASKS[name]
        lines = answer_lines(full_run.out, name)
        assert len(by_id(lines)) == full_run.task_questions[name] == results[name]["questions"]
        assert all(line["task"] == name and line["tokens"] <= 4 for line in lines)
        assert ("metrics" in results[name]) == task.scored
    for name in ("vqav2", "vizwiz", "mmbench", "mmbench_cn", "mmvet"):  # submission files
        assert results[name]["files"] and all((full_run.out / f).is_file() for f in results[name]["files"])
    sub = json.loads((full_run.out / "submissions" / "vqav2_test-dev.json").read_text())
    dev = {r["question_id"]: r["answer"] for r in answer_lines(full_run.out, "vqav2")}
    assert {r["question_id"]: r["answer"] for r in sub} == {**dev, 9: ""}  # test2015 questions beyond test-dev
    header = (full_run.out / "submissions" / "mmbench_test_en.tsv").read_text().splitlines()[0].split("\t")
    assert header[:7] == ["index", "question", "A", "B", "C", "D", "prediction"]
    mmvet = json.loads((full_run.out / "submissions" / "mmvet_results.json").read_text())
    assert set(mmvet) == {"v1_0", "v1_1"}
    assert len(list((full_run.out / "submissions" / "mme").glob("*.txt"))) == 14
    doc = json.loads((full_run.out / "results.json").read_text())
    assert doc["model"]["sha256"] and doc["image_tokenizer"]["weights_sha256"] and doc["versions"]["torch"]
    assert doc["protocol"]["tasks"]["vizwiz"]["prompt_suffix"].startswith("When the provided information")
    # POPE's three splits share four images, MME's pairs share one: each image was encoded once.
    assert doc["images"]["encoded"] < sum(full_run.task_questions.values())
    assert full_run.table.index("VQAv2") < full_run.table.index("SQA") < full_run.table.index("POPE")


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_results(full_run, tiny_model, bench_root, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "libra_cli.lm", "eval", "--model", str(tiny_model), "--tasks", ",".join(RUN_TASKS),
           "--data-root", str(bench_root), "--out", str(out), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    answers = out / "answers"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if answers.is_dir() and sum(len(p.read_bytes().splitlines()) for p in answers.glob("*.jsonl")) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = {p.stem: len(p.read_text().splitlines()) for p in answers.glob("*.jsonl")}
    assert sum(written.values()) < sum(full_run.task_questions.values())  # killed mid-run
    assert not (out / "results.json").exists()

    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_model), "--tasks", ",".join(RUN_TASKS),
                                    "--data-root", str(bench_root), "--out", str(out), *ARGS])
    assert res.exit_code == 0, res.output
    assert f"answered {sum(full_run.task_questions.values()) - sum(written.values())} question(s)" in res.output
    for name in RUN_TASKS:
        assert by_id(answer_lines(out, name)) == by_id(answer_lines(full_run.out, name)), name
    resumed = json.loads((out / "results.json").read_text())["tasks"]
    assert {k: v.get("metrics") for k, v in resumed.items()} == {k: v.get("metrics")
                                                                 for k, v in full_run.results["tasks"].items()}
    # A third run has nothing left to do and changes nothing.
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_model), "--tasks", "pope,mme", "--data-root",
                                    str(bench_root), "--out", str(out), *ARGS])
    assert res.exit_code == 0 and "answered 0 question(s)" in res.output


def test_interrupted_batch_is_redone_identically(full_run, tiny_model, bench_root, tmp_path, monkeypatch):  # noqa: F811
    real, calls = AnswerLog.append, []

    def crash_after_two(self, records):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(records))
        return real(self, records)

    monkeypatch.setattr(AnswerLog, "append", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config(tiny_model, bench_root, tmp_path, tasks="pope,mme"))
    monkeypatch.setattr(AnswerLog, "append", real)
    assert len(answer_lines(tmp_path, "pope")) == sum(calls) == 6
    result = run_eval(config(tiny_model, bench_root, tmp_path, tasks="pope,mme"))
    assert result.generated == 12 + 28 - 6
    for name in ("pope", "mme"):
        assert by_id(answer_lines(tmp_path, name)) == by_id(answer_lines(full_run.out, name))


def test_a_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "pope.jsonl"
    lines = [{"task": "pope", "question_id": f"random/{i}", "prompt": f"p{i}", "answer": "yes", "tokens": 1}
             for i in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"task": "pope", "question_id": "rand')
    log = AnswerLog(path, "pope", {qid_key(f"random/{i}"): f"p{i}" for i in (1, 2, 3)})
    assert set(log.records) == {qid_key("random/1"), qid_key("random/2")}
    assert path.read_text().endswith("}\n")
    with pytest.raises(ValueError, match="another prompt"):
        AnswerLog(path, "pope", {qid_key(f"random/{i}"): "changed" for i in (1, 2)})
    with pytest.raises(ValueError, match="holds answers of task 'pope', not 'mme'"):
        AnswerLog(path, "mme", {qid_key(f"random/{i}"): f"p{i}" for i in (1, 2)})


# ---- the readers and scorers agree: ground-truth answers score perfectly ----------------------------------
def oracle(task: str, q: Question) -> str:
    if task in ("vqav2_val", "okvqa", "vizwiz_val"):
        return q.answer["answers"][0]["answer"]
    if task == "gqa":
        return q.answer["answer"]
    if task == "scienceqa":
        return "ABCDE"[q.answer["answer"]]
    if task == "seed":
        return q.answer["answer"]
    if task == "mmvp":
        return f"({q.answer['answer']})"
    return q.answer  # POPE label, MME yes/no, MMBench letter


def test_ground_truth_answers_score_perfectly(tiny_model, bench_root, tmp_path, monkeypatch):  # noqa: F811
    def answer_batch(model, text_tok, bank, task, questions, template, max_new_tokens):
        return [{"task": task.name, "question_id": q.qid, "prompt": task.prompt(q), "answer": oracle(task.name, q),
                 "tokens": 1, "stop": "eos"} for q in questions]

    monkeypatch.setattr(eval_runner, "answer_batch", answer_batch)
    names = "vqav2_val,okvqa,gqa,vizwiz_val,scienceqa,pope,mme,mmbench_dev,mmbench_cn_dev,seed,mmvp"
    metrics = {k: v["metrics"] for k, v in run_eval(config(tiny_model, bench_root, tmp_path, tasks=names))
               .results["tasks"].items()}
    for name in ("vqav2_val", "okvqa", "vizwiz_val"):
        assert metrics[name]["overall"] == 100.0, name
    for name, key in (("gqa", "accuracy"), ("scienceqa", "accuracy"), ("pope", "f1"), ("seed", "accuracy"),
                      ("mmvp", "pair_accuracy"), ("mmbench_dev", "circular_accuracy"),
                      ("mmbench_cn_dev", "circular_accuracy")):
        assert metrics[name][key] == 100.0, name
    assert metrics["mme"]["perception"] == 2000.0 and metrics["mme"]["cognition"] == 800.0
    assert metrics["scienceqa"]["count"] == 4  # the text-only problem is not in the IMG subset
    assert metrics["mmbench_dev"]["questions"] == 2 and metrics["mmbench_dev"]["count"] == 7


# ---- rendering, limits, the table ---------------------------------------------------------------------------
def test_questions_are_rendered_as_llava_does(bench_root):  # noqa: F811
    mmb = TASKS["mmbench_dev"]
    q = next(q for q in mmb.read(bench_root) if q.qid == 1)
    assert mmb.prompt(q) == ("A hint.\nWhich 1?\nA. red\nB. blue\nC. green\nD. pink\n"
                             "Answer with the option's letter from the given choices directly.")
    q = next(q for q in mmb.read(bench_root) if q.qid == 0)
    assert "C. bird\nAnswer" in mmb.prompt(q)  # options end at the first empty column
    sqa = TASKS["scienceqa"]
    q = next(q for q in sqa.read(bench_root) if q.qid == "11")
    assert sqa.prompt(q) == ("Context: Look at the picture.\nWhich is warmer 1?\nA. ice\nB. fire\nC. snow\n"
                             "Answer with the option's letter from the given choices directly.")
    mme = TASKS["mme"]
    assert mme.prompt(mme.read(bench_root)[0]) == ("Is this a existence?\n"
                                                    "Answer the question using a single word or phrase.")
    assert TASKS["coco"].prompt(TASKS["coco"].read(bench_root)[0]) == "Provide a one-sentence caption for the " \
                                                                      "provided image."
    assert TASKS["vizwiz"].prompt(TASKS["vizwiz"].read(bench_root)[0]) == (
        "What is this 0?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")
    assert TASKS["mmbench_cn"].prompt(TASKS["mmbench_cn"].read(bench_root)[0]).endswith("\n请直接回答选项字母。")
    assert TASKS["mmvp"].prompt(TASKS["mmvp"].read(bench_root)[0]) == ("Is the door open? (a) Open (b) Closed\n"
                                                                        "Answer this question concisely.")


def test_limit_keeps_groups_whole_in_every_split(bench_root):  # noqa: F811
    mme = limit_questions(TASKS["mme"].read(bench_root), 1)
    assert len(mme) == 28  # one image pair in each of the 14 subtasks
    mmb = limit_questions(TASKS["mmbench_dev"].read(bench_root), 1)
    assert sorted(q.qid for q in mmb) == [0, 1_000_000, 2_000_000]  # question 0 with its circular copies
    pope = limit_questions(TASKS["pope"].read(bench_root), 2)
    assert [q.qid for q in pope] == ["random/1", "random/2", "popular/1", "popular/2", "adversarial/1",
                                     "adversarial/2"]


def test_the_table_follows_the_paper_column_order():
    tasks = get_tasks("mmvp,pope,coco,vqav2,mme")
    results = {"mmvp": {"metrics": {"pair_accuracy": 30.0}}, "pope": {"metrics": {"f1": 88.24}},
               "coco": {"metrics": {"CIDEr": 135.2}}, "vqav2": {}, "mme": {"metrics": {"perception": 1494.7,
                                                                                         "cognition": 281.1}}}
    table = paper_table(tasks, results, "libra")
    head1, row1, _, head2, row2 = table.splitlines()
    assert head1.split()[2:] == ["VQAv2", "COCO"] and row1.split()[1:] == ["submit", "135.2"]
    assert head2.split()[2:] == ["POPE", "MME", "MME^C", "MMVP"] and row2.split()[1:] == ["88.2", "1494.7", "281.1",
                                                                                           "30.0"]


# ---- image shards ------------------------------------------------------------------------------------------
def test_images_come_from_shards_with_the_same_answers(full_run, tiny_model, bench_root, tmp_path):  # noqa: F811
    from libra_tok.pipeline import encode_to_shards, load_tokenizer

    encode_to_shards([bench_root / "pope" / "val2014"], tmp_path / "shards", load_tokenizer(preset="tiny",
                                                                                          device="cpu"),
                     batch_size=4, num_workers=0, progress=False, save_features=True)
    result = run_eval(config(tiny_model, bench_root, tmp_path / "out", tasks="pope",
                             image_shards=[tmp_path / "shards"]))
    assert result.results["images"] == {"encoded": 0, "from_shards": 2}
    assert by_id(answer_lines(tmp_path / "out", "pope")) == by_id(answer_lines(full_run.out, "pope"))


# ---- bad inputs --------------------------------------------------------------------------------------------
def eval_cli(model, data, out, tasks):
    return CliRunner().invoke(main, ["eval", "--model", str(model), "--tasks", tasks, "--data-root", str(data),
                                     "--out", str(out), *ARGS])


def test_bad_inputs_are_named_with_the_expected_format(tiny_model, bench_root, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(bench_root / "pope", data / "pope")
    shutil.copytree(bench_root / "vqav2", data / "vqav2")
    missing = data / "pope" / "val2014" / "COCO_val2014_000000000001.jpg"
    missing.unlink()
    assert f"image {missing} does not exist" in cli_error(eval_cli(tiny_model, data, tmp_path / "o1", "pope"))

    questions = data / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps([{"question_id": 1}]))
    err = cli_error(eval_cli(tiny_model, data, tmp_path / "o2", "vqav2_val"))
    assert str(questions) in err and 'expected the VQA API questions JSON {"questions"' in err

    err = cli_error(eval_cli(tiny_model, data, tmp_path / "o3", "mmvp"))
    assert f"folder {data / 'mmvp'} does not exist" in err

    err = cli_error(eval_cli(tiny_model, bench_root, tmp_path / "o4", "pope,nope"))
    assert "unknown task 'nope'" in err


def test_a_folder_of_another_template_or_answer_length_is_refused(full_run, tiny_model, bench_root):  # noqa: F811
    for extra, what in ((["--template", "raw"], "template"), (["--max-new-tokens", "5"], "--max-new-tokens")):
        res = CliRunner().invoke(main, ["eval", "--model", str(tiny_model), "--tasks", "pope", "--data-root",
                                        str(bench_root), "--out", str(full_run.out), *ARGS, *extra])
        assert f"holds answers of another {what}" in cli_error(res)


def test_answers_of_another_task_are_refused(full_run, tiny_model, bench_root, tmp_path):  # noqa: F811
    (tmp_path / "answers").mkdir()
    shutil.copy(full_run.out / "answers" / "pope.jsonl", tmp_path / "answers" / "mme.jsonl")
    err = cli_error(eval_cli(tiny_model, bench_root, tmp_path, "mme"))
    assert f"{tmp_path / 'answers' / 'mme.jsonl'} holds answers of task 'pope', not 'mme'" in err


# ---- libra-lm score on the harness's files -----------------------------------------------------------------
def score_cli(*args):
    res = CliRunner().invoke(main, ["score", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


def test_score_commands_reproduce_the_harness_metrics(full_run, bench_root, tmp_path):  # noqa: F811
    got = full_run.results["tasks"]
    score_cli("mme", "--results-dir", full_run.out / "submissions" / "mme", "--json", tmp_path / "mme.json")
    mme = json.loads((tmp_path / "mme.json").read_text())
    assert mme["perception"] == got["mme"]["metrics"]["perception"]
    assert mme["cognition"] == got["mme"]["metrics"]["cognition"]

    vqa = answer_lines(full_run.out, "vqav2_val")
    (tmp_path / "res.json").write_text(json.dumps([{"question_id": r["question_id"], "answer": r["answer"]}
                                                   for r in vqa]))
    score_cli("vqa", "--annotations", bench_root / "vqav2" / "v2_mscoco_val2014_annotations.json", "--results",
              tmp_path / "res.json", "--json", tmp_path / "vqa.json")
    assert json.loads((tmp_path / "vqa.json").read_text())["overall"] == got["vqav2_val"]["metrics"]["overall"]

    pope = answer_lines(full_run.out, "pope")
    args = []
    for split in ("random", "popular", "adversarial"):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"question_id": int(r["question_id"].split("/")[1]), "text": r["answer"]})
                                + "\n" for r in pope if r["question_id"].startswith(split)))
        args += ["--questions", bench_root / "pope" / f"coco_pope_{split}.json", "--answers", path]
    score_cli("pope", *args, "--json", tmp_path / "pope.json")
    assert json.loads((tmp_path / "pope.json").read_text())["f1"] == pytest.approx(got["pope"]["metrics"]["f1"])

    mmb = answer_lines(full_run.out, "mmbench_dev")
    (tmp_path / "mmb.jsonl").write_text("".join(json.dumps({"question_id": r["question_id"], "text": r["answer"]})
                                                + "\n" for r in mmb))
    res = score_cli("mmbench", "--questions", bench_root / "mmbench" / "mmbench_dev_20230712.tsv", "--answers",
                    tmp_path / "mmb.jsonl")
    assert f"circular_accuracy: {got['mmbench_dev']['metrics']['circular_accuracy']:.2f}" in res.output

    for task, args in (("scienceqa", ["--base-dir", bench_root / "scienceqa"]),
                       ("seed", ["--questions", bench_root / "seed_bench" / "SEED-Bench.json"]),
                       ("mmvp", ["--questions", bench_root / "mmvp" / "Questions.csv"])):
        lines = answer_lines(full_run.out, task)
        extra = [{"question_id": "14", "answer": "A"}] if task == "scienceqa" else []  # a text-only problem: ignored
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"question_id": r["question_id"], "text": r["answer"]}) + "\n"
                                for r in lines + extra))
        score_cli(task, *args, "--answers", path, "--json", tmp_path / f"{task}.json")
        assert json.loads((tmp_path / f"{task}.json").read_text()) == got[task]["metrics"], task


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="pycocoevalcap needs java")
def test_score_caption_reproduces_the_harness(full_run, bench_root, tmp_path):  # noqa: F811
    score_cli("caption", "--annotations", bench_root / "coco" / "captions_karpathy_test.json", "--results",
              full_run.out / "submissions" / "coco_karpathy_test_results.json", "--json", tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["CIDEr"] == pytest.approx(
        full_run.results["tasks"]["coco"]["metrics"]["CIDEr"])


def test_score_refuses_incomplete_or_foreign_answers(bench_root, tmp_path):  # noqa: F811
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": 1, "text": "yes"}) + "\n")
    res = CliRunner().invoke(main, ["score", "pope", "--questions", str(bench_root / "pope" / "coco_pope_random.json"),
                                    "--answers", str(tmp_path / "a.jsonl")])
    assert "3 POPE question(s) have no answer" in cli_error(res)
    (tmp_path / "r.json").write_text(json.dumps({"question_id": 1, "answer": "x"}))
    res = CliRunner().invoke(main, ["score", "vqa", "--annotations", str(bench_root / "vqav2" /
                                                                        "v2_mscoco_val2014_annotations.json"),
                                    "--results", str(tmp_path / "r.json")])
    assert 'is not a JSON list; expected a VQA results JSON [{"question_id", "answer"}' in cli_error(res)
