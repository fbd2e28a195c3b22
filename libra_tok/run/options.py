"""Training options: config files, the options a run saves, and those that hold for one command.

Both trainers' `TrainConfig` dataclasses are `RunOptions`: every field can come from a YAML or
JSON file (`load_config_file`) and from the command line, and the run folder keeps them in
`train_config.json` (`saved_options`) so that `--resume` starts from them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Any

TRAIN_CONFIG = "train_config.json"  # in the run folder: the options of the run
# Options that hold for the command that gives them only: they are not saved with the run, so
# resuming it does not inherit them (e.g. permission to unpickle a file).
PER_COMMAND_OPTIONS = ("trust_pickle",)
TRUST_PICKLE_HELP = ("allow Python objects besides tensors when loading --init-from, the image tokenizer or CLIP "
                     "weights from pickle files (official vqgan.ckpt, pytorch_model.bin): unpickling can run code, "
                     "so only for files you trust; applies to this command only, never to the run's own checkpoints")


def option(help_text: str, **kwargs: Any) -> Any:
    """A dataclass field with its command-line help (the CLI's `dataclass_options` reads it)."""
    return field(metadata={"help": help_text}, **kwargs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of option names to values."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return data


def saved_options(config: Any) -> dict[str, Any]:
    """The options a run keeps (train_config.json, checkpoints): all but the per-command ones."""
    return {k: v for k, v in config.to_dict().items() if k not in PER_COMMAND_OPTIONS}


class RunOptions:
    """Base of a trainer's option dataclass: JSON-ready dict and config files. Subclasses
    define `from_dict` (which checks the names)."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, tuples as lists (as JSON and YAML write them)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str | Path) -> Any:
        return cls.from_dict(load_config_file(path))


__all__ = ["TRAIN_CONFIG", "PER_COMMAND_OPTIONS", "TRUST_PICKLE_HELP", "option", "load_config_file", "saved_options",
           "RunOptions"]
