"""Models by name: every loader takes a local path or a Hugging Face Hub id.

    resolve("runs/tok/final", IMAGE_TOKENIZER)            # a path that exists: used as it is
    resolve("YifanXu/libra-11b-chat", LM + TEXT_TOKENIZER)  # org/name[@revision]: the snapshot folder

A local path always wins. A string `org/name` or `org/name@revision` (a branch, a tag or a
commit; `refs/pr/3` works too) that is not a local path is fetched with huggingface_hub's
`snapshot_download` into its cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub), and only
the files the loader needs are downloaded: each loader names them as a `ModelFiles` (patterns
for `allow_patterns`; the weights as alternatives, safetensors first). `Path` objects are
always local paths. Offline (`HF_HUB_OFFLINE=1`, the CLI's `--offline` or `offline_mode()`),
ids resolve from the cache only. Whatever goes wrong (no network, a gated or private repo, a
revision that does not exist, a cache without the files) is one HubError (an OSError) naming
the id, the revision and what to do. See docs/hub.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .version import __version__

log = logging.getLogger("libra_tok.hub")

DEFAULT_REVISION = "main"
_OFFLINE = contextvars.ContextVar("libra_offline", default=False)
# org/name as the Hub spells repo ids (letters, digits, '-', '_', '.'; no '--' or '..'), then an
# optional @revision (branch names may hold '/', e.g. refs/pr/3).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[^\s@]+))?")


class HubError(OSError):
    """A Hub id could not be resolved; the message names the id, the revision and the fix.
    `incomplete`: the cache holds the repo but not all the files asked for."""

    def __init__(self, message: str, *, incomplete: bool = False):
        super().__init__(message)
        self.incomplete = incomplete


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None  # None: the default branch

    @property
    def label(self) -> str:
        return f"{self.repo_id} (revision {self.revision or DEFAULT_REVISION})"

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class ModelFiles:
    """The files of a repo that a loader needs: every file matching `patterns` (fnmatch, as
    `allow_patterns`), and the first group of `weights` the repo has (the safetensors of a
    model, else the .bin files of repos that have no safetensors)."""

    patterns: tuple[str, ...]
    weights: tuple[tuple[str, ...], ...] = ()

    def __add__(self, other: "ModelFiles") -> "ModelFiles":
        if self.weights and other.weights and self.weights != other.weights:
            raise ValueError("two sets of weight alternatives cannot be combined")
        return ModelFiles(tuple(dict.fromkeys(self.patterns + other.patterns)), self.weights or other.weights)

    def groups(self) -> list[list[str]]:
        """The allow_patterns to try, in order: the patterns with each weights group."""
        return [list(dict.fromkeys(self.patterns + group)) for group in self.weights] or [list(self.patterns)]


# What each loader reads (docs/official-formats.md for the official layouts).
CONFIG = ModelFiles(("config.json",))
# A libra-tok folder (config.json + model.safetensors) or the official tokenizer: vqgan.ckpt and
# vision_tokenizer_config.yaml, whose encoder_name names a CLIP folder beside them that gives the
# architecture (its config.json; the weights are in vqgan.ckpt).
IMAGE_TOKENIZER = ModelFiles(("config.json", "model.safetensors", "vqgan.ckpt", "vision_tokenizer_config.yaml",
                              "*/config.json"))
# The official tokenizer alone (libra_tok.checkpoint.load_official).
OFFICIAL_TOKENIZER = ModelFiles(("vqgan.ckpt", "vision_tokenizer_config.yaml", "*/config.json"))
# An LM folder (ours, official Libra, HF LLaMA): config.json and the weights, without the image
# tokenizer (vqgan.ckpt is 3.25 GB) or the text tokenizer unless asked for.
LM = ModelFiles(("config.json",), weights=(
    ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"),
))
TEXT_TOKENIZER = ModelFiles(("tokenizer.model",))
# The image tokenizer an LM folder holds (libra_lm.checkpoint.image_tokenizer_for): our
# image_tokenizer/ sub-folder, or the official vqgan.ckpt beside the LM.
LM_IMAGE_TOKENIZER = ModelFiles(("config.json", "image_tokenizer/*", "vqgan.ckpt", "vision_tokenizer_config.yaml",
                                 "*/config.json"))
# CLIP weights (HF CLIP or open_clip repos, e.g. openai/clip-vit-large-patch14-336), and the
# architecture alone (an HF CLIP config.json).
CLIP_ARCHITECTURE = CONFIG
CLIP_WEIGHTS = ModelFiles(("config.json",), weights=(
    ("model.safetensors",), ("open_clip_model.safetensors",), ("pytorch_model.bin",),
    ("open_clip_pytorch_model.bin",),
))


def lm_files(*, text_tokenizer: bool = False, image_tokenizer: bool = False) -> ModelFiles:
    """The files of an LM repo, with its text tokenizer and its image tokenizer when asked for."""
    files = LM
    if text_tokenizer:
        files = files + TEXT_TOKENIZER
    if image_tokenizer:
        files = files + LM_IMAGE_TOKENIZER
    return files


# ---- names --------------------------------------------------------------------------------------
def parse_hub_id(ref: object) -> HubId | None:
    """The HubId a string spells (`org/name` or `org/name@revision`), else None. Paths that
    start with '/', '.', '~' or hold '\\' or more than one '/' before '@' are not ids, and
    neither is any `Path` object."""
    if not isinstance(ref, str) or ref[:1] in ("/", ".", "~") or "\\" in ref:
        return None
    match = _HUB_ID.fullmatch(ref)
    if match is None:
        return None
    repo = match.group("repo")
    if "--" in repo or ".." in repo or repo.endswith((".git", ".")):
        return None
    return HubId(repo, match.group("revision"))


def is_hub_id(ref: object) -> bool:
    """True when `ref` names a Hub repo and no local path of that name exists."""
    return parse_hub_id(ref) is not None and not Path(str(ref)).expanduser().exists()


def label_for(ref: str | Path, folder: Path) -> str:
    """The name a model goes by: a Hub repo's name (without org and revision; its snapshot
    folder is named by a commit), else the folder's name."""
    hub = parse_hub_id(ref)
    return hub.repo_id.split("/")[1] if hub is not None and folder != Path(ref).expanduser() else folder.name


# ---- offline mode and the cache -------------------------------------------------------------------
@contextlib.contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """Resolve ids from the cache only inside this block (as HF_HUB_OFFLINE=1 does)."""
    token = _OFFLINE.set(enabled or _OFFLINE.get())
    try:
        yield
    finally:
        _OFFLINE.reset(token)


def is_offline() -> bool:
    """offline_mode() is active or HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to 1/on/yes/true."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return _OFFLINE.get() or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    """The Hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (read
    at each call, so that a process may change it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# ---- resolving ------------------------------------------------------------------------------------
def resolve(ref: str | Path, files: ModelFiles = CONFIG) -> Path:
    """The local folder of `ref`: the path itself when it exists or is no Hub id (the loader
    then says what is missing), else the snapshot of the Hub repo with the `files` it needs."""
    hub = parse_hub_id(ref)
    local = Path(ref).expanduser()
    if hub is None or local.exists():
        return local
    folder, first_error = None, None
    for patterns, weights in zip(files.groups(), files.weights or [()], strict=True):
        try:
            folder = _snapshot(hub, patterns)
        except HubError as exc:
            if not (exc.incomplete and files.weights):
                raise
            first_error = first_error or exc  # a cache without these weights may hold the next ones
            continue
        if not files.weights or _has_any(folder, weights):
            log.debug("%s -> %s", hub, folder)
            return folder
    if first_error is not None:
        raise first_error
    if is_offline():
        wanted = " or ".join(", ".join(group) for group in files.weights)
        raise HubError(f"the copy of {hub.label} in the Hugging Face cache ({folder}) has none of the weight files "
                       f"({wanted}) while offline mode is on: {_fetch_hint(hub)}", incomplete=True)
    return folder  # the repo has no weights the loader knows: the loader says what it expected


def pinned(ref: str | Path) -> str:
    """How to record where a model came from: an id pinned to the commit of its cached snapshot
    (`org/name@<sha>`), else the absolute local path."""
    hub = parse_hub_id(ref)
    if hub is None or Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().resolve())
    with offline_mode():  # resolved (downloaded) just before: the cache has it
        folder = _snapshot(hub, ["config.json"])
    return f"{hub.repo_id}@{folder.name}"


def _has_any(folder: Path, patterns: list[str]) -> bool:
    files = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return any(fnmatch.fnmatch(f, pattern) for f in files for pattern in patterns)


def _snapshot(hub: HubId, patterns: list[str]) -> Path:
    """The one call of snapshot_download: the files of `patterns`, from the cache only when offline."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            hub.repo_id, revision=hub.revision, allow_patterns=patterns, cache_dir=cache_dir(),
            local_files_only=is_offline(), library_name="libra", library_version=__version__))
    except (OSError, ValueError) as exc:
        raise _explain(exc, hub) from exc


def _fetch_hint(hub: HubId) -> str:
    return (f"download it once where there is network (`hf download {hub.repo_id} --revision "
            f"{hub.revision or DEFAULT_REVISION}`, with HF_HUB_CACHE={cache_dir()}), or copy the model folder to this "
            f"machine and pass its path")


def _login_hint() -> str:
    return "log in with `hf auth login` (or set HF_TOKEN)"


def _explain(exc: BaseException, hub: HubId) -> HubError:
    """One HubError for whatever snapshot_download raised."""
    from huggingface_hub import errors

    url = f"https://huggingface.co/{hub.repo_id}"
    if isinstance(exc, errors.GatedRepoError):
        message = (f"{hub.label} is a gated model on the Hugging Face Hub: accept its licence at {url} with your "
                   f"account, then {_login_hint()}; or copy the model folder to this machine and pass its path")
    elif isinstance(exc, errors.RepositoryNotFoundError):
        message = (f"{hub.repo_id} is neither a local path nor a model on the Hugging Face Hub (no repository "
                   f"{url}); check the name, or if it is private {_login_hint()}")
    elif isinstance(exc, errors.RevisionNotFoundError):
        message = (f"{hub.repo_id} has no revision {hub.revision or DEFAULT_REVISION!r} on the Hugging Face Hub: give "
                   f"a branch, tag or commit it has ({hub.repo_id}@REVISION; see {url}/tree/main)")
    elif isinstance(exc, errors.LocalEntryNotFoundError):
        incomplete = type(exc).__name__ == "IncompleteSnapshotError"
        if incomplete:
            missing = re.search(r"are missing \((.*?)\)\. (?:The Hub|Outgoing)", str(exc))
            what = (f"the copy of {hub.label} in the Hugging Face cache {cache_dir()} lacks files this loader needs"
                    + (f" ({missing.group(1)})" if missing else ""))
        else:
            what = f"{hub} is no local path, and {hub.label} is not in the Hugging Face cache {cache_dir()}"
        if is_offline() or isinstance(exc.__cause__, errors.OfflineModeIsEnabled):
            return HubError(f"{what} while offline mode is on (--offline or HF_HUB_OFFLINE=1): {_fetch_hint(hub)}",
                            incomplete=incomplete)
        cause = f" ({_first_line(exc.__cause__)})" if exc.__cause__ is not None else ""
        return HubError(f"{what}, and the Hugging Face Hub cannot be reached{cause}: check the network (a proxy, "
                        f"HF_ENDPOINT), or {_fetch_hint(hub)}", incomplete=incomplete)
    elif isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            message = f"the Hugging Face Hub refused access to {hub.label} ({status}): {_login_hint()}"
        else:
            message = f"the Hugging Face Hub failed to serve {hub.label} ({_first_line(exc)}); try again later"
    else:
        message = f"cannot fetch {hub.label} from the Hugging Face Hub: {_first_line(exc)}"
    return HubError(message)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


__all__ = ["HubError", "HubId", "ModelFiles", "parse_hub_id", "is_hub_id", "resolve", "pinned", "offline_mode",
           "is_offline", "cache_dir", "CONFIG", "IMAGE_TOKENIZER", "LM", "TEXT_TOKENIZER", "LM_IMAGE_TOKENIZER",
           "CLIP_ARCHITECTURE", "CLIP_WEIGHTS", "OFFICIAL_TOKENIZER", "DEFAULT_REVISION", "lm_files", "label_for"]
