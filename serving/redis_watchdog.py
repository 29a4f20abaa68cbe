"""Watchdog of an embedded redis-server: stops it once no client has been connected for a while.

``python .../serving/redis_watchdog.py SOCKET PIDFILE IDLE_SECONDS`` (run as a script: it imports
only redis-py, not the lrs_rec package) — started by
:func:`serving.connection.embedded_server` right after it started the server. It detaches at once
(double fork: the starter never waits for it, no zombie is left), then every second lists the
server's clients (itself and release probes excluded). When none has been connected for
``IDLE_SECONDS`` in a row — every ``lrs-rec`` process using the server is gone, for instance a
``kill -9``'ed ``serve`` whose exit hooks never ran — it shuts the server down (saving; the
append-only file has every acknowledged write anyway) and exits. It also exits when the server is
gone by itself. A running ``lrs-rec`` process always holds a connection, so the rule is the same as
the exit hooks' ("the last user to leave stops it"), only without needing that user to exit cleanly.
"""

from __future__ import annotations

import os
import sys
import time

POLL = 1.0  # seconds between checks
WATCHDOG_CLIENT_NAME = "lrs-rec-watchdog"  # this process's connection (not a user)
RELEASE_CLIENT_NAME = "lrs-rec-release"  # serving.connection.release_embedded's probe
NOT_USERS = frozenset({RELEASE_CLIENT_NAME, WATCHDOG_CLIENT_NAME})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def watch(sock: str, pidfile: str, idle: float) -> None:
    import redis

    pid = None
    for _ in range(50):  # the daemonised server writes its pid file right after starting
        pid = _read_pid(pidfile)
        if pid is not None:
            break
        time.sleep(0.1)
    if pid is None:
        return
    client = redis.Redis(
        unix_socket_path=sock,
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        client_name=WATCHDOG_CLIENT_NAME,
    )
    idle_since: float | None = None
    while _alive(pid):
        try:
            users = [c for c in client.client_list() if c.get("name") not in NOT_USERS]
        except (redis.RedisError, OSError):
            users = None  # busy (loading, a slow fsync) or going away: decide next time
        now = time.monotonic()
        if users:
            idle_since = None
        elif users is not None:
            idle_since = now if idle_since is None else idle_since
            if now - idle_since >= idle and _read_pid(pidfile) == pid:
                try:
                    client.shutdown(save=True)
                except (redis.RedisError, OSError):
                    pass  # the server closes the connection as it exits
                return
        time.sleep(POLL)


def main(argv: list[str]) -> int:
    sock, pidfile, idle = argv[0], argv[1], float(argv[2])
    if os.fork() > 0:  # the starter waits for this parent only
        return 0
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    try:
        watch(sock, pidfile, idle)
    finally:
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
