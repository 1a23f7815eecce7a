"""``mlcil torchrun [torchrun options] COMMAND ...``: torchrun with mlcil as its program.

``torchrun --standalone --nproc_per_node=8 -m mlcil.cli train ...`` works, but when a worker
stops with a clean error (a config problem: exit status 2), torchrun itself then prints a
40-line traceback of its own. ``mlcil torchrun --standalone --nproc_per_node=8 train ...`` runs
the same launcher (``torch.distributed.run``, every torchrun option as torchrun takes it) with
``-m mlcil.cli`` as the program, and ends as mlcil does: the error line that rank 0 printed,
the worker's exit status, and no traceback. A worker that fails otherwise (an internal error, a
signal) is named in one line.

The torchrun options end at the first mlcil command name (``train``, ``eval``...) or at ``--``
(needed when mlcil's own options come first: ``mlcil torchrun --nproc_per_node=2 -- -q train``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Sequence

from mlcil.errors import ConfigError

USAGE = (
    "usage: mlcil torchrun [torchrun options] COMMAND [mlcil options]\n"
    "  e.g. mlcil torchrun --standalone --nproc_per_node=8 train --config coco-b0-c10\n"
    "  torchrun options: torchrun --help; mlcil options before the command: put -- first"
)


def split_arguments(
    arguments: Sequence[str], commands: Collection[str]
) -> tuple[list[str], list[str]]:
    """``(torchrun options, mlcil arguments)``: split at ``--`` or at the first command name.

    Raises:
        ConfigError: when no mlcil command follows the torchrun options.
    """
    arguments = list(arguments)
    if "--" in arguments:
        at = arguments.index("--")
        return arguments[:at], arguments[at + 1 :]
    for at, word in enumerate(arguments):
        if word in commands:
            return arguments[:at], arguments[at:]
    raise ConfigError(
        f"mlcil torchrun: no mlcil command after the torchrun options ({', '.join(commands)})"
    )


def exit_status(code: int) -> int:
    """A worker's exit code as a shell status (a signal N is 128 + N)."""
    return code if code > 0 else 128 - code if code < 0 else 1


def launch(arguments: Sequence[str], commands: Collection[str]) -> int:
    """Run ``mlcil COMMAND ...`` under torchrun's launcher; returns the exit status.

    Args:
        arguments: what follows ``mlcil torchrun``.
        commands: mlcil's command names (where the torchrun options end).
    """
    if not arguments or arguments[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    options, program = split_arguments(arguments, commands)
    args = get_args_parser().parse_args([*options, "-m", "mlcil.cli", *program])
    if args.no_python:
        raise ConfigError("mlcil torchrun: --no-python does not apply (the program is mlcil)")
    # torchrun's own lines about a failed worker: the worker said why, and one line below says
    # which worker failed otherwise.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        status = exit_status(failure.exitcode)
        if status not in (2, 130):  # a clean error or an interruption: the worker said so
            print(
                f"error: mlcil torchrun: rank {rank} failed with exit code {failure.exitcode} "
                "(its output above says why)",
                file=sys.stderr,
            )
        return status
    return 0
