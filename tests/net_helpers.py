"""A free local TCP port (for Prefect servers, PostgreSQL and torchrun rendezvous); no Prefect import, so
tests that run on a GPU machine without Prefect can use it too."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
