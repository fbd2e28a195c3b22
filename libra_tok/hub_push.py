"""Pushing our folders to the Hugging Face Hub, with a generated model card.

    push_to_hub("runs/tok", "me/libra-tok-laion", datasets=["laion/laion400m"])

Three kinds of folder go up: a tokenizer folder and an LM folder written by `save_pretrained`,
and a training run (a folder with train_config.json and final/), whose final model goes up
with its training options and loss plot. What is pushed is an allow-list: config.json and
safetensors weights (sharded or not), an LM's tokenizer.model and image_tokenizer/, a run's
train_config.json and loss.png, the eval results given, and README.md, the model card
(libra_tok.model_card). Checkpoints, optimizer state, data and anything else in the folders
stay behind (`PushPlan.left_out` lists them). All files go up in one commit.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hub import HubError, is_offline, parse_hub_id
from .model_card import CardInfo, infer_base_models, infer_license, render_card
from .run.metrics_log import METRICS, read_metrics
from .run.options import TRAIN_CONFIG
from .version import __version__

log = logging.getLogger("libra_tok.hub_push")

KINDS = {"libra-tok": "tokenizer", "libra-lm": "lm"}
# Files of each kind of model folder that are pushed (fnmatch patterns of paths in the folder).
MODEL_FILES = {
    "tokenizer": ("config.json", "model.safetensors"),
    "lm": ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
           "tokenizer.model", "image_tokenizer/config.json", "image_tokenizer/model.safetensors"),
}
RUN_FILES = (TRAIN_CONFIG, "loss.png")  # of a run folder, beside its final model
EVAL_RESULTS_FILE = "eval_results.json"  # the eval results given, in the repo
_COMMANDS = {"tokenizer": "libra-tok push", "lm": "libra-lm push"}
_NAMES = {"tokenizer": "an image tokenizer (libra-tok) folder", "lm": "a libra-lm model folder"}


@dataclass
class PushPlan:
    """What a push uploads: `files` (path in the repo -> local file) and the card (README.md)."""

    repo_id: str
    kind: str  # "tokenizer" or "lm"
    files: dict[str, Path]
    card: str
    left_out: list[str] = field(default_factory=list)  # files of the folders that stay behind


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None


def locate(folder: str | Path) -> tuple[Path, Path | None, str]:
    """(model folder, run folder or None, kind) of a model folder or a training run."""
    folder = Path(folder).expanduser()
    run = None
    if (folder / TRAIN_CONFIG).is_file() and (folder / "final" / "config.json").is_file():
        folder, run = folder / "final", folder
    elif folder.name == "final" and (folder.parent / TRAIN_CONFIG).is_file():
        run = folder.parent
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is neither a model folder written by save_pretrained (no config.json) nor "
                                f"a training run ({TRAIN_CONFIG} and final/); pass one of those")
    meta = _read_json(folder / "config.json", "the model config")
    kind = KINDS.get(meta.get("format")) if isinstance(meta, dict) else None
    if kind is None:
        found = meta.get("model_type") or meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{folder / 'config.json'} is not a libra-tok or libra-lm config (found {found!r}): only "
                         f"folders written by save_pretrained (or `libra-tok convert-official`) and training runs "
                         f"are pushed")
    return folder, run, kind


def _select(folder: Path, patterns: tuple[str, ...]) -> tuple[dict[str, Path], list[str]]:
    """(files matching `patterns` by their path in `folder`, the other files)."""
    chosen, others = {}, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            chosen[name] = path
        else:
            others.append(name)
    return chosen, others


def _train_summary(run: Path) -> dict[str, Any] | None:
    rows = read_metrics(run / METRICS)
    if not rows:
        return None
    summary: dict[str, Any] = {"steps": max(int(r.get("step", 0)) for r in rows)}
    for key in ("loss", "val_loss"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            summary[f"last {key.replace('_', ' ')}"] = float(values[-1])
    return summary


def _eval_results(path: str | Path) -> tuple[dict[str, Any], Path]:
    """An eval results file: `libra-lm eval`'s results.json (or its --out folder), or the
    JSON summary of `libra-tok eval --json`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"eval results {path} do not exist; pass the results.json written by `libra-lm eval` "
                                f"(or its output folder) or the --json file of `libra-tok eval`")
    results = _read_json(path, "eval results")
    if not isinstance(results, dict):
        raise ValueError(f"eval results {path} hold a JSON {type(results).__name__}, not the object `libra-lm eval` "
                         f"or `libra-tok eval --json` writes")
    return results, path


def _image_tokenizer_files(source: str | Path) -> dict[str, Path]:
    """image_tokenizer/ of an LM repo: the files of a libra-tok folder (a path or Hub id)."""
    from .hub import IMAGE_TOKENIZER, resolve

    folder = resolve(source, IMAGE_TOKENIZER)
    config = folder / "config.json"
    meta = _read_json(config, "the image tokenizer config") if config.is_file() else {}
    if not isinstance(meta, dict) or meta.get("format") != "libra-tok" or not (folder / "model.safetensors").is_file():
        raise ValueError(f"--image-tokenizer {source}: expected a libra-tok folder (config.json + model.safetensors, "
                         f"e.g. from `libra-tok convert-official`)")
    return {f"image_tokenizer/{name}": folder / name for name in MODEL_FILES["tokenizer"]}


def plan_push(folder: str | Path, repo_id: str | None, *, expect: str | None = None,
              base_models: list[str] | tuple[str, ...] | None = None, datasets: list[str] | tuple[str, ...] = (),
              license: str | None = None, tags: list[str] | tuple[str, ...] = (),
              eval_results: str | Path | None = None, image_tokenizer: str | Path | None = None) -> PushPlan:
    """What pushing `folder` (a model folder or a training run) to `repo_id` uploads.

    expect: "tokenizer" or "lm" to refuse the other kind. base_models: Hub ids the model was built
    from (default: inferred from the run's --init-from and a tokenizer's CLIP weights). datasets:
    Hub ids or names of the training data. license: a Hub licence id (default: that of a known
    base model, else "other"). eval_results: a results file to table in the card and push.
    image_tokenizer: an LM's image tokenizer (libra-tok folder or Hub id) to push as image_tokenizer/."""
    hub = parse_hub_id(repo_id) if repo_id else None
    if hub is None or hub.revision is not None:
        raise ValueError(f"repo_id must be a Hub repo id 'org/name' (your user or organisation, and a name), got "
                         f"{repo_id!r}; give a branch with revision=... (CLI --revision)")
    model_dir, run, kind = locate(folder)
    if expect is not None and kind != expect:
        raise ValueError(f"{model_dir} holds {_NAMES[kind]}, not {_NAMES[expect]}: push it with `{_COMMANDS[kind]}`")
    files, left_out = _select(model_dir, MODEL_FILES[kind])
    left_out = [f"{model_dir.name}/{name}" if run else name for name in left_out]
    train_config = summary = None
    if run is not None:
        run_files, others = _select(run, RUN_FILES)
        files.update(run_files)
        left_out = [*(name for name in others if not name.startswith(f"{model_dir.name}/")), *left_out]
        train_config = _read_json(run / TRAIN_CONFIG, "the training options")
        summary = _train_summary(run)
    meta = _read_json(model_dir / "config.json", "the model config")
    if image_tokenizer is not None:
        if kind != "lm":
            raise ValueError("image_tokenizer is for LM folders (the image tokenizer pushed beside the LM)")
        if any(name.startswith("image_tokenizer/") for name in files):
            raise ValueError(f"{model_dir} already holds image_tokenizer/; push without --image-tokenizer")
        files.update(_image_tokenizer_files(image_tokenizer))
    elif kind == "lm" and not any(name.startswith("image_tokenizer/") for name in files):
        source = (meta.get("image_tokenizer") or {}).get("source")
        if source and parse_hub_id(source) is None:
            log.warning("%s records its image tokenizer at %s, which others cannot reach: push it beside the LM with "
                        "--image-tokenizer PATH (image_tokenizer=...)", model_dir, source)
    results = None
    if eval_results is not None:
        results, results_path = _eval_results(eval_results)
        files[EVAL_RESULTS_FILE] = results_path
    if not any(name.endswith(".safetensors") and not name.startswith("image_tokenizer/") for name in files):
        raise FileNotFoundError(f"{model_dir} holds no weights to push (model.safetensors or its shards)")
    bases = list(base_models) if base_models else infer_base_models(kind, meta, train_config)
    info = CardInfo(kind=kind, repo_id=hub.repo_id, meta=meta, base_models=bases, datasets=list(datasets),
                    license=license or infer_license(bases), tags=list(tags), train_config=train_config,
                    train_summary=summary, eval_results=results, files=sorted(files))
    return PushPlan(hub.repo_id, kind, dict(sorted(files.items())), render_card(info), left_out)


def upload(plan: PushPlan, *, revision: str | None = None, private: bool | None = None,
           commit_message: str | None = None, create_pr: bool = False) -> str:
    """Create the repo if needed (private: its visibility when created) and commit the plan's files
    and card in one commit to `revision` (a branch, created if missing; default main), or open
    a pull request. Returns the URL of the commit or pull request."""
    if is_offline():
        raise HubError(f"pushing to {plan.repo_id} needs the network, but offline mode is on (--offline or "
                       f"HF_HUB_OFFLINE=1)")
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
    message = commit_message or f"Upload {'image tokenizer' if plan.kind == 'tokenizer' else 'Libra LM'} with libra"
    api = HfApi(library_name="libra", library_version=__version__)
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(plan.repo_id, operations, commit_message=message, revision=revision,
                                   create_pr=create_pr)
    except (OSError, ValueError) as exc:  # HfHubHTTPError is an OSError
        raise _push_error(exc, plan.repo_id) from exc
    return commit.pr_url or commit.commit_url


def _push_error(exc: BaseException, repo_id: str) -> HubError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if status == 401:
        return HubError(f"cannot push to {repo_id}: not logged in to the Hugging Face Hub; log in with `hf auth login` "
                        f"(a token with write access) or set HF_TOKEN")
    if status == 403:
        return HubError(f"cannot push to {repo_id}: your token may not write there ({first}); use a token with write "
                        f"access to that user or organisation")
    return HubError(f"cannot push to {repo_id}: {first}")


def push_to_hub(folder: str | Path, repo_id: str | None, *, revision: str | None = None,
                private: bool | None = None, commit_message: str | None = None, create_pr: bool = False,
                **card_options: Any) -> str:
    """Push a tokenizer or LM folder, or a training run, to `repo_id` with a model card
    (plan_push takes `card_options`; upload the rest). Returns the commit or pull request URL."""
    plan = plan_push(folder, repo_id, **card_options)
    for name in plan.left_out:
        log.info("not pushed: %s", name)
    return upload(plan, revision=revision, private=private, commit_message=commit_message, create_pr=create_pr)


__all__ = ["PushPlan", "plan_push", "upload", "push_to_hub", "locate", "MODEL_FILES", "RUN_FILES",
           "EVAL_RESULTS_FILE"]
