"""`libra-lm`: the Libra language model on the command line (thin front ends)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="libra")
def main() -> None:
    """Libra LM: LLaMA with a routed visual expert and the cross-modal bridge."""


if __name__ == "__main__":
    main()
