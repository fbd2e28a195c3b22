"""Shared CLI plumbing: user errors become one clear line, not a traceback."""

from __future__ import annotations

import functools
import math
import os

import click

# Errors caused by what the user gave (a value, a file, a folder): their message says what is
# wrong and how to fix it. Everything else (a bug, a CUDA out-of-memory, a KeyError) keeps its
# traceback, which is what a bug report needs.
USER_ERRORS = (ValueError, OSError)


class FiniteFloat(click.FloatRange):
    """A float option, optionally bounded as click.FloatRange, that also refuses NaN and the
    infinities (every comparison with NaN is False, so FloatRange alone lets it through)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def fail_on_errors(fn):
    """Turn user errors (ValueError, OSError and their subclasses) into `Error: <message>` and
    exit status 1 (set LIBRA_DEBUG=1 to see the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if os.environ.get("LIBRA_DEBUG"):
                raise
            raise click.ClickException(_message(exc)) from exc

    return wrapper


def _message(exc: BaseException) -> str:
    """The one line shown for a user error; OSErrors raised by the system (errno set) name
    the file and the reason, e.g. "runs/x: Not a directory"."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc)


# ---- dataclass <-> command-line options -------------------------------------------------------
def _field_kind(tp) -> tuple[str, type | None]:
    """('flag' | 'list' | 'tuple' | 'mapping' | 'scalar', scalar type) of a field annotation."""
    import types
    import typing

    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _field_kind(args[0])
    if tp is bool:
        return "flag", bool
    if origin is list or tp is list:
        return "list", str
    if origin is tuple or tp is tuple:
        return "tuple", args[0] if args else str
    if origin is dict or tp is dict:
        return "mapping", None
    return "scalar", tp if tp in (int, float, str) else str


def dataclass_options(cls, skip: tuple[str, ...] = ()):
    """Add one `--field-name` option per dataclass field, documented from the field's
    metadata["help"]. Options default to None ("not given"), so they override a config file
    only where the user typed them; `options_to_overrides` collects them."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)

    def decorator(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            kind, scalar = _field_kind(hints[f.name])
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            help_text = f.metadata.get("help", "")
            name = f.name.replace("_", "-")
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} [default: {shown}]"
            if kind == "flag":
                fn = click.option(f"--{name}/--no-{name}", f.name, default=None, help=help_text)(fn)
            elif kind == "list":
                fn = click.option(f"--{name}", f.name, multiple=True, help=help_text + " (repeatable)")(fn)
            elif kind == "tuple":
                fn = click.option(f"--{name}", f.name, default=None, metavar="A,B",
                                  callback=_tuple_callback(scalar), help=help_text)(fn)
            elif kind == "mapping":
                fn = click.option(f"--{name}", f.name, default=None, metavar="YAML",
                                  callback=_mapping_callback, help=help_text + " (a YAML/JSON mapping)")(fn)
            else:
                fn = click.option(f"--{name}", f.name, default=None, type=scalar, help=help_text)(fn)
        return fn

    return decorator


def _tuple_callback(scalar):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(scalar(v.strip()) for v in value.split(","))
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {scalar.__name__} values, got {value!r}") from None

    return parse


def _mapping_callback(ctx, param, value):
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"not a YAML mapping: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"expected a mapping such as '{{clip_pretrained: /path}}', got {value!r}")
    return data


def options_to_overrides(options: dict) -> dict:
    """The options the user gave (None and empty repeatable options mean "not given")."""
    return {k: v for k, v in options.items() if v is not None and not (isinstance(v, tuple) and len(v) == 0)}


def run_file_options(fn):
    """--config FILE and --resume, shared by the training commands (see run_options)."""
    fn = click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its latest checkpoint "
                      "(its saved options are the base; options given here override them, e.g. a larger --steps).")(fn)
    fn = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                      help="YAML or JSON file of training options; command-line options override it.")(fn)
    return fn


def run_options(cls, config_file, resume: bool, options: dict, data=()) -> dict:
    """Options of a training run: the config file (or, with --resume and no file, the options
    the run in --out-dir saved), overridden by what was given on the command line."""
    from pathlib import Path

    from libra_tok.run.options import TRAIN_CONFIG, load_config_file

    overrides = options_to_overrides(options)
    base: dict = load_config_file(config_file) if config_file else {}
    saved = Path(overrides.get("out_dir", base.get("out_dir", cls.out_dir))) / TRAIN_CONFIG
    if resume and not config_file and saved.is_file():
        base = load_config_file(saved)
    if data:
        overrides["data"] = [str(d) for d in data]
    return {**base, **overrides}
