"""Command line: ``mlcil train | eval | predict | data | list | configs | compare | pretrain |
weights | report | torchrun`` (also ``python -m mlcil`` and ``python -m mlcil.cli``).

:func:`main` runs a command and turns its errors into one line and an exit status;
:mod:`mlcil.cli.parser` defines the options; the commands are :mod:`mlcil.cli.run_commands`
(train, eval, predict, compare, report) and :mod:`mlcil.cli.setup_commands` (data, list,
configs, weights, pretrain).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from mlcil.cli.parser import COMMANDS, build_parser
from mlcil.cli.run_commands import started_run
from mlcil.errors import MlcilError, clip

# The console handler main() installs, if it installed one (a host that set up logging, such as
# pytest, keeps its own handlers untouched).
_console: logging.Handler | None = None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _configure_logging(quiet: bool) -> None:
    """Log lines on stderr: INFO and up, or with ``-q`` warnings and errors only.

    The run's ``train.log`` raises the ``mlcil`` logger to INFO, and a record reaches every
    handler above its logger whatever those loggers' levels, so ``-q`` sets the level of the
    console handler itself (a root logger level alone would let every training line through).
    """
    global _console
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
        )
        _console = root.handlers[0]
    if _console is not None and _console in root.handlers:
        _console.setLevel(level)


def _load_plugins(args: argparse.Namespace) -> None:
    """The plugins of ``--plugin`` and ``MLCIL_PLUGINS``, then those a ``--config`` records (the
    ``config.yaml`` of an earlier run given as a config)."""
    from mlcil.plugins import load_plugins, plugin_names

    given = [*(args.plugins or []), *(getattr(args, "command_plugins", None) or [])]
    load_plugins(plugin_names(given))
    configs = list(getattr(args, "config", None) or [])
    configs += [part for spec in getattr(args, "configs", None) or [] for part in spec.split("+")]
    if configs:
        from mlcil.runs import import_config_plugins

        import_config_plugins(configs)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mlcil`` command; returns the exit status (0 done, 1 internal error, 2 bad input or
    a file error, 130 interrupted).

    Under torchrun, a clean error, an interruption and the dry run's summary are printed by
    rank 0 only (every rank meets the same config); other errors by every rank, named."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["torchrun"]:
        return _torchrun(arguments[1:])
    args = build_parser().parse_args(arguments)
    _configure_logging(args.quiet or _rank() != 0)
    try:
        _load_plugins(args)  # before any config is read: configs may name what they register
        return int(args.func(args))
    except KeyboardInterrupt as interrupt:
        if _rank() == 0:
            print(f"interrupted: {_after_interrupt(interrupt)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left early (`mlcil predict ... | head`): not an error of this command. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        clean = isinstance(error, MlcilError)
        if not clean or _rank() == 0:
            where = f"rank {_rank()}: " if not clean and _world_size() > 1 else ""
            print(f"error: {where}{_describe(error, started_run[0])}", file=sys.stderr)
        return 2 if isinstance(error, MlcilError | OSError) else 1
    finally:
        started_run[0] = None


def _after_interrupt(interrupt: KeyboardInterrupt) -> str:
    """What is kept after Ctrl-C: the comparison says it itself; a run says its checkpoint."""
    if str(interrupt):
        return _one_line(interrupt)
    if started_run[0] is None:
        return "nothing was written"
    from mlcil.rundir import RunDir

    return RunDir(started_run[0]).describe_kept()


def _rank() -> int:
    from mlcil.runtime import environment_rank

    return environment_rank()


def _world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() else 1


def _torchrun(arguments: list[str]) -> int:
    """``mlcil torchrun ...`` (mlcil.launch): torchrun with mlcil as its program."""
    from mlcil.launch import launch

    try:
        return launch(arguments, [name for name in COMMANDS if name != "torchrun"])
    except MlcilError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2


def _describe(error: Exception, run: Path | None = None) -> str:
    """One line naming what went wrong (and, for a file error, the file, and what of the run
    ``run`` is kept). At most ``_MESSAGE_CHARACTERS`` long."""
    if isinstance(error, MlcilError):
        return clip(_one_line(error), _MESSAGE_CHARACTERS)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        reason = f"{where}{error.strerror or _one_line(error)} (errno {error.errno})"
        if run is not None:
            from mlcil.rundir import RunDir

            reason += f"; {RunDir(run).describe_kept()}"
        return clip(reason, _MESSAGE_CHARACTERS)
    return clip(
        f"internal error {type(error).__name__}: {_one_line(error)} (run with --debug for the "
        "traceback)",
        _MESSAGE_CHARACTERS,
    )


# No message line is longer: a value quoted from an input is cut well before (mlcil.errors).
_MESSAGE_CHARACTERS = 2000


__all__ = ["COMMANDS", "build_parser", "main"]
