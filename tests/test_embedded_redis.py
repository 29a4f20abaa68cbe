"""The embedded redis-server's files and lifetime (issue 12 §3, issue 16 D7/D13/D15): LRS_HOME
defaults to the per-user data directory, the socket never falls back to a shared predictable path,
data files are private, nothing is left in the temp directory, and a ``kill -9``'ed ``serve``
leaves no orphan redis-server."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.connection import (
    EMBEDDED_PID,
    UnsafeRedisPathError,
    connect,
    embedded_server,
    embedded_socket,
    lrs_home,
    stop_embedded,
)
from lrs_rec.serving.redis_watchdog import _alive
from lrs_rec.training.testing import random_trained_model, write_model_dir

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "model"
    write_model_dir(random_trained_model(n_users=30, n_items=20, random_state=5), out)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.1)
    return time.monotonic() - t0


def test_lrs_home_defaults_to_the_per_user_data_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LRS_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert lrs_home() == tmp_path / "xdg" / "lrs-rec"
    if sys.platform.startswith("linux"):
        monkeypatch.delenv("XDG_DATA_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert lrs_home() == tmp_path / "home" / ".local" / "share" / "lrs-rec"
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "mine"))
    assert lrs_home() == tmp_path / "mine" and lrs_home("x") == Path("x")


@pytest.mark.slow
def test_publish_in_one_folder_serve_in_another_then_kill9_leaves_no_orphan(tmp_path, model_dir):
    """LRS_HOME unset, HOME/XDG_DATA_HOME in a temp dir: `publish` run in one folder and `serve`
    in another share the store; the clean exits leave nothing in TMPDIR; after `kill -9` of
    serve its redis-server is stopped by the watchdog within a bounded time."""
    a, b, tmp = tmp_path / "a", tmp_path / "b", tmp_path / "tmp"
    for d in (a, b, tmp):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LRS_HOME", "LRS_REDIS_URL")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_DATA_HOME=str(tmp_path / "xdg"),
        TMPDIR=str(tmp),
        LRS_REDIS_IDLE_EXIT="2",
    )
    env.pop("XDG_RUNTIME_DIR", None)
    store = tmp_path / "xdg" / "lrs-rec"
    cli = [sys.executable, "-m", "lrs_rec.serving.cli"]
    done = subprocess.run(
        [*cli, "publish", "--model", str(model_dir), "--json"],
        cwd=a, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == "v1"
    assert (store / "appendonly.aof").is_file() and not (a / ".lrs-rec").exists()
    # D15: no temporary redis directory after a clean exit (publish checks model.onnx with ONNX
    # Runtime, whose import leaves its one fixed-name '.ses' file in TMPDIR: not ours)
    assert {p.name for p in tmp.iterdir()} <= {".ses"}
    assert not os.path.exists(store / "redis.sock")  # the last user stopped the server
    port = _free_port()
    proc = subprocess.Popen(
        [*cli, "serve", "--model", str(model_dir), "--port", str(port)],
        cwd=b, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def ready() -> bool:
            assert proc.poll() is None, "serve exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        _wait(ready, 60, "serve (other folder) did not find the published store")
        pid = int((store / EMBEDDED_PID).read_text())
        assert _alive(pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        took = _wait(lambda: not _alive(pid), 20, "orphan redis-server still running")
        print(f"redis-server gone {took:.1f} s after kill -9 of serve (idle exit 2 s)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_embedded(store, save=False)
    # only onnxruntime's own telemetry session file (one fixed name, written when it is imported),
    # nothing of lrs-rec's or the redis-server's
    assert {p.name for p in tmp.iterdir()} <= {".ses"}


def test_a_client_keeps_the_server_alive_and_the_watchdog_stops_it_once_none_is_left(
    home, monkeypatch
):
    monkeypatch.setenv("LRS_REDIS_IDLE_EXIT", "1")
    handle = connect(home=home)
    assert handle.client.ping()
    pid = int((home / EMBEDDED_PID).read_text())
    time.sleep(2.5)  # > the idle limit, with a client connected
    assert _alive(pid) and handle.client.ping()
    handle.close()
    _wait(lambda: not _alive(pid), 15, "the watchdog did not stop an unused server")
    assert not os.path.exists(embedded_socket(home))


def test_data_files_are_private(home, model_dir, monkeypatch):
    """D13: LRS_HOME 0700, the RDB dump and the append-only file 0600 (also files of an older,
    laxer version, fixed at the next start)."""
    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    assert cli_main(["publish", "--model", str(model_dir)]) == 0
    stop_embedded(home)  # saves the RDB dump
    assert _mode(home) == 0o700
    for name in ("redis.rdb", "appendonly.aof"):
        assert _mode(home / name) == 0o600, name
        os.chmod(home / name, 0o644)
    embedded_server(home)
    assert all(_mode(home / n) == 0o600 for n in ("redis.rdb", "appendonly.aof"))
    assert stat.S_IMODE(os.lstat(embedded_socket(home)).st_mode) & 0o077 == 0


def test_a_home_with_spaces_and_quotes_starts_the_server(tmp_path):
    """LRS_HOME with a space (macOS: ~/Library/Application Support/lrs-rec) or a quote: the
    generated redis.conf left the logfile path unquoted and redis-server exited with "Bad
    directive or wrong number of arguments"."""
    home = tmp_path / "a b'c"  # short enough for the socket to live in it (quoted as well)
    try:
        sock = embedded_server(home)
        assert Path(sock).parent == home
        handle = connect(home=home)
        assert handle.client.ping()
        handle.close()
        assert (home / "redis.log").is_file()  # the log went where it was asked to
    finally:
        stop_embedded(home, save=False)
    assert not os.path.exists(sock)


def test_long_home_uses_a_private_socket_directory_and_removes_it(tmp_path, monkeypatch):
    """D7: a too-long LRS_HOME puts the socket in a per-user 0700 directory (never a predictable
    shared path), removed again after a clean stop."""
    import tempfile

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    long_home = tmp_path / ("x" * 60) / ("y" * 60)
    sock = embedded_socket(long_home)
    private = tmp_path / "t" / f"lrs-rec-{os.getuid()}"
    assert Path(sock).parent == private and len(sock) < 100
    try:
        assert embedded_server(long_home) == sock
        assert _mode(private) == 0o700 and os.stat(private).st_uid == os.getuid()
        assert connect(home=long_home).client.ping()
    finally:
        stop_embedded(long_home, save=False)
    assert not private.exists()


def test_a_socket_directory_or_socket_of_someone_else_is_refused(tmp_path, monkeypatch, capsys):
    """D7: a planted non-socket file at the socket path, or a pre-created socket directory owned
    by another user (needs root to create): a clear one-line error, no server started or joined."""
    import tempfile

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    long_home = tmp_path / ("x" * 60) / ("y" * 60)
    sock = Path(embedded_socket(long_home))
    sock.parent.mkdir(parents=True, mode=0o777)
    os.chmod(sock.parent, 0o777)
    sock.write_text("not a socket")
    with pytest.raises(UnsafeRedisPathError, match="not a socket of yours"):
        embedded_server(long_home)
    assert _mode(sock.parent) == 0o700  # our own directory: tightened
    sock.unlink()
    if os.getuid() != 0:
        pytest.skip("creating a directory owned by another user needs root")
    os.chown(sock.parent, 4242, 4242)
    with pytest.raises(UnsafeRedisPathError, match="owned by uid 4242, not by you"):
        embedded_server(long_home)
    monkeypatch.setenv("LRS_HOME", str(long_home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    assert cli_main(["publish", "--list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not by you" in err and str(sock.parent) in err
    assert not sock.exists()  # nothing was started there


def test_lrs_home_that_is_a_file_is_one_clear_line(tmp_path, monkeypatch, capsys):
    # regression: "[Errno 17] File exists: '...'" named the path but not what was wrong with it
    home = tmp_path / "afile"
    home.write_text("")
    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    assert cli_main(["publish", "--list"]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"lrs-rec publish: error: LRS_HOME {home} is not a directory (a file is in the way)\n"
    )


def test_publish_warns_that_float16_loses_a_tiny_rating_scale(tmp_path, monkeypatch, capsys):
    """float16 has no normal numbers below 6.1e-5: on a rating scale a millionth wide its records
    carried ~1 % error without a word (robustness campaign); publish now says so, float32 does not."""
    import dataclasses

    model = random_trained_model(n_users=10, n_items=8, random_state=6)
    tiny = dataclasses.replace(model, rating_min=0.0, rating_max=1e-6, global_mean=5e-7)
    out = tmp_path / "tiny"
    write_model_dir(tiny, out)
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    try:
        assert cli_main(["publish", "--model", str(out)]) == 0
        err = capsys.readouterr().err
        assert "warning: the model's rating scale spans only 1e-06" in err
        assert "--precision float32" in err
        assert cli_main(["publish", "--model", str(out), "--precision", "float32"]) == 0
        assert "warning" not in capsys.readouterr().err
    finally:
        stop_embedded(tmp_path / "home")
