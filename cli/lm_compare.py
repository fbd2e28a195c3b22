"""`libra-lm compare`: designs trained on the same LLaMA and data side by side (e.g. Libra vs
HoVLE, docs/hovle.md): loss curves on one plot, benchmark tables in one."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail_on_errors


def _labelled(ctx, param, values):
    """LABEL=FOLDER pairs -> {label: folder}."""
    out = {}
    for value in values:
        label, sep, folder = value.partition("=")
        if not sep or not label or not folder:
            raise click.BadParameter(f"{value!r} is not LABEL=FOLDER")
        out[label] = folder
    return out


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--run", "runs", multiple=True, callback=_labelled,
              help="LABEL=RUN_FOLDER: a `libra-lm train` --out-dir whose loss curve goes on the plot (repeatable).")
@click.option("--eval", "evals", multiple=True, callback=_labelled,
              help="LABEL=EVAL_FOLDER: a `libra-lm eval` --out whose results go in the table (repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for loss.png (every run on one plot) and results.md (the eval tables side by side).")
@fail_on_errors
def compare_command(runs: dict, evals: dict, out_dir: Path) -> None:
    """Compare designs on the same LLaMA and data, e.g. Libra vs HoVLE (docs/hovle.md): the
    training losses of the --run folders on one plot, the benchmark columns of the --eval
    folders side by side."""
    from libra_lm.hovle.compare import plot_runs, side_by_side

    if not runs and not evals:
        raise click.UsageError("give at least one --run or --eval")
    if runs:
        click.echo(f"loss curves: {plot_runs(runs, out_dir / 'loss.png')}")
    if evals:
        from libra_tok.fileio import atomic_write_bytes

        table = side_by_side(evals)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "results.md", (table + "\n").encode())
        click.echo(table)
