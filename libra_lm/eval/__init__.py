"""The paper's benchmark harness (Tab. 1, 2, 5, 6): `libra-lm eval` and `libra-lm score`.

    questions  one shape for every benchmark's questions; reading official files
    prompts    rendering as LLaVA-1.5 does (hint, "A. ..." options, the Tab. 6 prompt)
    tasks/     each benchmark: its files, split, prompt, max new tokens, scorer, submission file
    scoring/   the official rules as plain functions (no model): VQA, POPE, MME, MMBench, captions...
    answers    answers/<task>.jsonl, appended per batch, resumed by question id
    images     image segments, from libra-tok shards or encoded here, each image once
    runner     run_eval: batched greedy generation over the tasks, results.json and the table
    results    digests, versions, the table in the paper's column order
"""

from .tasks import TASKS, get_tasks

__all__ = ["TASKS", "get_tasks"]
