"""The `raybert` command line. Each subcommand lives beside its job (jobs/<job>.py), parses its
arguments, builds the job's typed config and calls that job's `main(cfg)`."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="raybert")
def cli() -> None:
    """raybert: BERT at scale on Ray (batch scoring, MLM pretraining, fine-tuning)."""


def _register() -> None:
    # Each job module defines one click command (or a few) named after it. Importing is cheap:
    # job modules import ray / deepspeed lazily inside main().
    import importlib

    for module, names in [("jobs.score", ["score"]),
                          ("jobs.pretrain", ["pretrain", "vocab"])]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real import error inside the module: surface it
                raise
            continue
        for name in names:
            cli.add_command(getattr(mod, name))


_register()

if __name__ == "__main__":
    cli()
