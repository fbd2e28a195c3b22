"""The Hugging Face Hub on the command line: options that take a model (a path or a Hub id),
--offline, and `libra-tok push` / `libra-lm push`."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .common import fail_on_errors

MODEL_HELP = "a local path or a Hugging Face Hub id org/name[@revision]"


class ModelRef(click.ParamType):
    """A model option's value: an existing local path (as a Path), else a Hub id `org/name` or
    `org/name@revision` (as the string, resolved by the loaders through libra_tok.hub)."""

    name = "PATH|ID"

    def __init__(self, dir_okay: bool = True, file_okay: bool = True):
        self.dir_okay, self.file_okay = dir_okay, file_okay

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        from libra_tok.hub import parse_hub_id

        path = Path(value)
        if path.exists():
            if path.is_dir() and not self.dir_okay:
                self.fail(f"{value!r} is a folder; a file is expected", param, ctx)
            if not path.is_dir() and not self.file_okay:
                self.fail(f"{value!r} is a file; a folder or a Hub id is expected", param, ctx)
            return path
        if parse_hub_id(value) is not None:
            return value
        self.fail(f"{value!r} is neither an existing path nor a Hugging Face Hub id (org/name[@revision])", param, ctx)


def offline_option(fn):
    """--offline: resolve Hub ids from the local cache only (as HF_HUB_OFFLINE=1) while the command runs."""

    @functools.wraps(fn)
    def wrapper(*args, offline: bool = False, **kwargs):
        from libra_tok.hub import offline_mode

        with offline_mode(offline):
            return fn(*args, **kwargs)

    return click.option("--offline", is_flag=True, help="Resolve Hub ids from the local Hugging Face cache only, "
                        "never the network (as HF_HUB_OFFLINE=1).")(wrapper)


def _push_command(kind: str) -> click.Command:
    what = "a tokenizer" if kind == "tokenizer" else "an LM"

    @click.command("push", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.argument("repo_id")
    @click.option("--revision", default=None, help="Branch to commit to (created if missing). Default: main.")
    @click.option("--private", is_flag=True, default=None,
                  help="Create the repo private (a repo that exists keeps its visibility).")
    @click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
    @click.option("--commit-message", default=None, help="Message of the commit.")
    @click.option("--license", "license_", default=None,
                  help="Licence id for the card's metadata (e.g. apache-2.0, mit, llama2). Default: that of a known "
                       "base model (llama2 for LLaMA 2), else 'other'.")
    @click.option("--dataset", "datasets", multiple=True,
                  help="Hub id or name of a training dataset, for the card (repeatable).")
    @click.option("--base-model", "base_models", multiple=True,
                  help="Hub id of a model this one was built from (repeatable). Default: the run's --init-from and, "
                       "for a tokenizer, its CLIP weights, when they are Hub repos.")
    @click.option("--tag", "tags", multiple=True, help="Extra tag for the card's metadata (repeatable).")
    @click.option("--eval-results", type=click.Path(exists=True, path_type=Path), default=None,
                  help="Evaluation results to table in the card and push as eval_results.json: the results.json of "
                       "`libra-lm eval` (or its --out folder) or the --json file of `libra-tok eval`.")
    @click.option("--dry-run", is_flag=True, help="List the files and print the model card; upload nothing.")
    @fail_on_errors
    def push(folder: Path, repo_id: str, revision, private, create_pr, commit_message, license_, datasets,
             base_models, tags, eval_results, dry_run, image_tokenizer=None) -> None:
        from libra_tok.hub_push import plan_push, upload

        plan = plan_push(folder, repo_id, expect=kind, base_models=base_models, datasets=datasets, license=license_,
                         tags=tags, eval_results=eval_results, image_tokenizer=image_tokenizer)
        width = max(len(name) for name in plan.files)
        for name, path in plan.files.items():
            click.echo(f"{name:<{width}}  <- {path} ({path.stat().st_size / 1e6:.1f} MB)")
        click.echo(f"{'README.md':<{width}}  <- the model card ({len(plan.card)} characters)")
        if plan.left_out:
            click.echo(f"not pushed ({len(plan.left_out)} file(s)): {', '.join(plan.left_out[:8])}"
                       + (", ..." if len(plan.left_out) > 8 else ""))
        if dry_run:
            click.echo("\n" + plan.card)
            return
        url = upload(plan, revision=revision, private=private, commit_message=commit_message, create_pr=create_pr)
        click.echo(f"pushed {len(plan.files) + 1} files to {plan.repo_id}: {url}")

    push.help = (
        f"Push {what} to the Hugging Face Hub repo REPO_ID (org/name), with a generated model card.\n\n"
        f"FOLDER is {what} folder written by save_pretrained"
        + (" or `libra-tok convert-official`" if kind == "tokenizer" else "")
        + ", or a training run (the --out-dir of `train`: its final model goes up with train_config.json and "
        "loss.png). Only the model's config, safetensors weights"
        + (", tokenizer.model and image_tokenizer/" if kind == "lm" else "")
        + " and the card are pushed, in one commit: never checkpoints, optimizer state or data. The card "
        "(README.md) has the Hub metadata (library, tags, base models, datasets, licence), the model's "
        "configuration, the training options and the evaluation table. Log in first (`hf auth login` or "
        "HF_TOKEN)."
    )
    if kind == "lm":
        push = click.option("--image-tokenizer", type=ModelRef(), default=None,
                            help="The image tokenizer the LM reads (a libra-tok folder or Hub id), pushed beside it "
                                 "as image_tokenizer/ so that `libra-lm generate --model REPO_ID` finds it.")(push)
    return push


tok_push_command = _push_command("tokenizer")
lm_push_command = _push_command("lm")

__all__ = ["ModelRef", "MODEL_HELP", "offline_option", "tok_push_command", "lm_push_command"]
