"""The `raybert` command line. Each subcommand lives beside its job (jobs/<job>.py): it parses its
arguments, builds the job's typed config and calls that job's `main(cfg)`. Job modules import
ray and deepspeed inside `main`, so `raybert --help` stays fast."""

from __future__ import annotations

import click

from jobs.finetune import finetune
from jobs.pretrain import pretrain, vocab
from jobs.score import score
from jobs.submit import submit


@click.group()
@click.version_option(package_name="raybert")
def cli() -> None:
    """raybert: BERT at scale on Ray (batch scoring, MLM pretraining, fine-tuning)."""


cli.add_command(score)
cli.add_command(pretrain)
cli.add_command(vocab)
cli.add_command(finetune)
cli.add_command(submit)

if __name__ == "__main__":
    cli()
