"""Disk full under the embedded Redis (ENOSPC).

The embedded ``redis-server`` fsyncs every write to its append-only file (``appendfsync always``);
when that write fails — a full disk — Redis cannot keep its promise and exits. Restarting it at once
would only crash it again at the next write (readiness flapping, every write a crash). So while the
data directory has less than :data:`MIN_FREE_BYTES` free, the embedded server is not restarted, and
every error names the cause and the directory (:func:`disk_full`); it is restarted, from the
append-only file, once space is freed.
"""

from __future__ import annotations

import errno
import logging
import os

from lrs_rec.serving.connection import lrs_home

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 20  # below this the embedded server is left down (an AOF write may fail)


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes available to this user on the file system of ``path`` (None if it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def disk_full(home: str | os.PathLike[str] | None = None) -> str | None:
    """One line naming ENOSPC and the data directory when the embedded server's disk is full (less
    than :data:`MIN_FREE_BYTES` free), else None."""
    root = lrs_home(home).resolve()
    free = free_bytes(root if root.exists() else root.parent)
    if free is None or free >= MIN_FREE_BYTES:
        return None
    return (
        f"no space left on device ({errno.errorcode[errno.ENOSPC]}) in the embedded Redis data "
        f"directory {root}: {free} bytes free; Redis stops when it cannot append a write to "
        f"its append-only file, and is started again once {MIN_FREE_BYTES >> 10} KiB are free"
    )
