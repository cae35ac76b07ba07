"""A free local TCP port, for servers and rendezvous started on 127.0.0.1 (Prefect, PostgreSQL, torchrun,
Chromium's DevTools). Standard library only: GPU machines without Prefect import it too."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
