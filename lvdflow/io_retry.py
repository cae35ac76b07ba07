"""Retrying reads that fail for transient reasons (network file systems, object-store mounts).

Only errors that can go away on their own are retried, with exponential backoff: EIO, ETIMEDOUT, EAGAIN,
ESTALE, connection resets, ... A missing file, a permission error or a corrupt file fails at once (a
retry cannot fix it and would only delay the quarantine row that reports it).
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ESTALE, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EINTR, errno.EBUSY,
})


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, ConnectionError)) or (
        isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS)


def retry_io(fn: Callable[[], T], *, attempts: int = 4, base_delay: float = 0.5, what: str = "read",
             sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried on transient I/O errors after 0.5, 1, 2, ... seconds; the last error is raised."""
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, exc, attempt + 1, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")
