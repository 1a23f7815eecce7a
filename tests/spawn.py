"""Helpers for tests that spawn other processes: torch.distributed workers (gloo on the CPU), and
another process holding a run folder's lock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def join_as_torchrun(rank: int, world_size: int, port: int) -> None:
    """Set the environment torchrun gives a worker (one thread: the test machine is small)."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s run lock until it is killed (or its standard
    input closes); returns once the lock is held."""
    code = textwrap.dedent(
        f"""
        import sys
        from mlcil.rundir import RunDir
        run = RunDir({str(folder)!r})
        run.acquire_lock()
        print("locked", flush=True)
        sys.stdin.readline()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process
