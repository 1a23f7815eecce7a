"""Under torchrun, errors and summaries are printed once (rank 0); ``mlcil torchrun`` ends a
clean error as mlcil does: one line, the worker's exit status, no traceback of torchrun's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlcil.cli import COMMANDS, build_parser
from mlcil.errors import ConfigError
from mlcil.launch import exit_status, split_arguments


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MLCIL_CACHE": str(tmp_path / "c")}
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=environment, capture_output=True, text=True
    )


def test_the_torchrun_options_end_at_the_command_or_at_a_double_dash() -> None:
    commands = ["train", "eval"]
    assert split_arguments(["--standalone", "--nproc_per_node=2", "train", "--config", "x"],
                           commands) == (["--standalone", "--nproc_per_node=2"],
                                         ["train", "--config", "x"])  # fmt: skip
    assert split_arguments(["--nproc_per_node", "2", "--", "-q", "train"], commands) == (
        ["--nproc_per_node", "2"],
        ["-q", "train"],
    )
    with pytest.raises(ConfigError, match="no mlcil command after the torchrun options"):
        split_arguments(["--standalone"], commands)
    assert (exit_status(2), exit_status(-15), exit_status(0)) == (2, 143, 1)
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(COMMANDS) == set(choices)  # the launcher knows every command


def test_mlcil_torchrun_prints_a_clean_error_once_without_a_traceback(tmp_path: Path) -> None:
    failed = run(tmp_path, "-m", "mlcil", "torchrun", "--standalone", "--nproc_per_node=2",
                 "train", "--config", "no-such-config")  # fmt: skip
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        "error: config file not found: no-such-config (no such file, nor a packaged config of "
        "that name: `mlcil configs` lists them)"
    ]
    planned = run(tmp_path, "-m", "mlcil", "torchrun", "--standalone", "--nproc_per_node=2",
                  "train", "--config", "digits-b0-c2", "--dry-run")  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.count("run: digits_B0-C2_krt_s0") == 1  # the summary, once


def test_plain_torchrun_prints_the_error_once(tmp_path: Path) -> None:
    failed = run(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "-m", "mlcil.cli", "train", "--config", "no-such-config")  # fmt: skip
    assert failed.returncode != 0
    assert failed.stderr.count("error: config file not found: no-such-config") == 1
