"""Helpers for tests that spawn real torch.distributed processes (gloo on the CPU)."""

from __future__ import annotations

import os
import socket

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
