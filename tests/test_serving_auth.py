"""API keys: the keys file, `lrs-rec keys add`, 401/403/200 per scope per route, the bind rule,
and secrets never in logs or metrics (a real embedded Redis; one test runs a real uvicorn)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving import auth
from lrs_rec.serving.app import create_app
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.recommender import Recommender
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model, write_model_dir

from lrs_rec.model_dir import load_model_dir

pytestmark = pytest.mark.redis

SECRETS = {"read": "r-" + "a" * 40, "write": "w-" + "b" * 40, "admin": "adm-" + "c" * 40}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("auth") / "model"
    write_model_dir(
        random_trained_model(n_users=60, n_items=30, d=8, rank=4, sparsity=4, random_state=7), out
    )
    return out


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(
        "# scope key-id sha256\n\n"
        + "".join(auth.key_line(s, f"k-{s}", sec) + "\n" for s, sec in SECRETS.items())
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def client(model_dir, home, keys_file):
    from lrs_rec.serving.connection import connect

    RedisStore(connect(home=home)).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    rec = Recommender(model_dir, home=home, version_refresh_interval=0)
    app = create_app(rec, api_keys=auth.load_api_keys(keys_file))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# (method, path, body, scope needed); each call uses its own user so DELETE finds someone to erase
ROUTES = [
    ("POST", "/v1/score", {"user_id": "u1", "item_ids": ["i1", "i2"]}, "read"),
    ("POST", "/v1/recommend", {"user_id": "u1", "n": 3}, "read"),
    ("GET", "/v1/model", None, "read"),
    ("PUT", "/v1/users/{u}/ratings", {"ratings": [{"item_id": "i1", "rating": 4.0}]}, "write"),
    ("GET", "/v1/users/{u}/ratings", None, "write"),
    ("DELETE", "/v1/users/{u}", None, "write"),
]
CREDENTIALS = {  # name -> Authorization header (None: no header)
    "none": None,
    "not-bearer": "Basic " + SECRETS["admin"],
    "empty-bearer": "Bearer ",
    "wrong-secret": "Bearer " + "x" * 42,
    "hash-as-secret": "Bearer " + hashlib.sha256(SECRETS["admin"].encode()).hexdigest(),
    "read": "Bearer " + SECRETS["read"],
    "write": "Bearer " + SECRETS["write"],
    "admin": "bearer " + SECRETS["admin"],  # the scheme is case-insensitive
}
RANK = {"read": 0, "write": 1, "admin": 2}


def _expected(cred: str, needed: str) -> int:
    if cred not in RANK:
        return 401
    return 200 if RANK[cred] >= RANK[needed] else 403


@pytest.mark.parametrize("cred", list(CREDENTIALS))
def test_status_per_scope_per_route(client, cred):
    for n, (method, path, body, needed) in enumerate(ROUTES):
        user = f"u{10 + n}"
        headers = {} if CREDENTIALS[cred] is None else {"Authorization": CREDENTIALS[cred]}
        r = client.request(method, path.format(u=user), json=body, headers=headers)
        want = _expected(cred, needed)
        assert r.status_code == want, (cred, method, path, r.text)
        assert "error" in r.json() if want != 200 else True
        if want == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        if want == 403:
            assert needed in r.json()["error"] and f"k-{cred}" in r.json()["error"]
            assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # refused requests changed nothing: u15 (DELETE) is still a trained user with a record
    admin = {"Authorization": CREDENTIALS["admin"]}
    erased = client.get("/v1/users/u15/ratings", headers=admin).status_code == 404
    assert erased == (_expected(cred, "write") == 200)


def test_open_routes_need_no_credentials(client):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    # the schema declares the bearer scheme on the guarded routes
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/score"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_no_keys_means_no_checks(model_dir, home):
    from lrs_rec.serving.connection import connect

    RedisStore(connect(home=home)).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    rec = Recommender(model_dir, home=home, version_refresh_interval=0)
    with TestClient(create_app(rec)) as c:
        assert c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]}).status_code == 200
        assert c.get("/v1/users/u1/ratings").status_code == 200
        assert "HTTPBearer" not in c.get("/openapi.json").text


def test_secrets_never_in_logs_or_metrics(client, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    wrong = "Zz9-not-a-key-" + "q" * 30
    for cred in [*SECRETS.values(), wrong]:
        for method, path, body, _ in ROUTES:
            client.request(
                method, path.format(u="u3"), json=body, headers={"Authorization": f"Bearer {cred}"}
            )
    metrics = client.get("/metrics").text
    out, err = capsys.readouterr()
    assert "lrs_http_requests_total" in metrics
    for secret in [*SECRETS.values(), wrong]:
        for where in (caplog.text, out, err, metrics):
            assert secret not in where


def test_uvicorn_debug_log_never_shows_a_secret(model_dir, tmp_path, keys_file):
    """A real `lrs-rec serve --api-keys` at --log-level debug: its whole output has no secret."""
    home = tmp_path / "h"
    env = {**os.environ, "LRS_HOME": str(home)}
    env.pop("LRS_REDIS_URL", None)
    port = _free_port()
    from lrs_rec.serving.connection import connect

    handle = connect(home=home)  # published in-process: one interpreter start less
    RedisStore(handle).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    log = tmp_path / "serve.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrs_rec.serving.cli", "serve", "--model", str(model_dir),
             "--port", str(port), "--api-keys", str(keys_file), "--log-level", "debug"],
            env=env, stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(base, proc)
        for secret in [*SECRETS.values(), "wrong-" + "y" * 30]:
            h = {"Authorization": f"Bearer {secret}"}
            httpx.post(f"{base}/v1/score", json={"user_id": "u1", "item_ids": ["i1"]}, headers=h)
            httpx.get(f"{base}/v1/users/u2/ratings", headers=h)
        assert httpx.get(f"{base}/v1/model").status_code == 401
        assert httpx.get(f"{base}/v1/model", headers={"Authorization": "Bearer " + SECRETS["read"]}).status_code == 200  # fmt: skip
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
        from lrs_rec.serving.connection import stop_embedded

        stop_embedded(home, save=False)
    text = log.read_text(errors="replace") + metrics
    assert "listening on" in text
    for secret in [*SECRETS.values(), "wrong-" + "y" * 30]:
        assert secret not in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited"
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail("serve did not come up")


# -- keys file and `lrs-rec keys` -------------------------------------------------------------------------
def test_keys_add_prints_the_secret_once_and_stores_its_hash(tmp_path, capsys):
    path = tmp_path / "sub" / "keys"
    path.parent.mkdir()
    assert cli_main(["keys", "add", "--scope", "write", "--file", str(path), "--key-id", "ci"]) == 0
    out = capsys.readouterr().out
    secret = out.splitlines()[-1]
    assert out.endswith(secret + "\n") and len(secret) >= 40 and " " not in secret
    assert "ci" in out and "write" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"write ci {hashlib.sha256(secret.encode()).hexdigest()}\n"
    assert secret not in path.read_text()
    # a second key (random id) appends; both authenticate with their own scope
    assert cli_main(["keys", "add", "--scope", "read", "--file", str(path)]) == 0
    second = capsys.readouterr().out.splitlines()[-1]
    ring = auth.load_api_keys(path)
    assert [k.scope for k in ring.keys] == ["write", "read"]
    assert ring.authenticate(secret).key_id == "ci"  # type: ignore[union-attr]
    assert ring.authenticate(second).scope == "read"  # type: ignore[union-attr]
    assert ring.authenticate(second + "x") is None and second != secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # listing shows ids and scopes, no hashes
    assert cli_main(["keys", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "ci" in listed and hashlib.sha256(secret.encode()).hexdigest() not in listed
    # a repeated id is refused, the file is unchanged
    before = path.read_text()
    assert cli_main(["keys", "add", "--scope", "read", "--file", str(path), "--key-id", "ci"]) == 2
    assert "already has a key of that id" in capsys.readouterr().err
    assert path.read_text() == before


def test_keys_add_to_a_missing_directory_or_a_directory_is_one_clear_line(tmp_path, capsys):
    # regression: "[Errno 2] No such file or directory" / "[Errno 21] Is a directory"
    missing = tmp_path / "nodir" / "keys"
    for target, message in [
        (missing, f"--file {missing}: directory {missing.parent} does not exist"),
        (tmp_path, f"--file {tmp_path} is a directory; give a file name"),
    ]:
        assert cli_main(["keys", "add", "--scope", "read", "--file", str(target)]) == 2
        assert capsys.readouterr().err == f"lrs-rec keys: error: {message}\n"
    assert not missing.parent.exists()


def test_keys_add_refuses_a_world_writable_file_as_serve_does(tmp_path, capsys):
    # keys add appended to it, and serve --api-keys then refused the file
    path = tmp_path / "keys"
    assert cli_main(["keys", "add", "--scope", "read", "--file", str(path), "--key-id", "a"]) == 0
    os.chmod(path, 0o666)
    before = path.read_bytes()
    capsys.readouterr()
    assert cli_main(["keys", "add", "--scope", "admin", "--file", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"lrs-rec keys: error: --file {path}: the file is world-writable, so anyone could add a "
        f"key: chmod o-w {path}\n"
    )
    assert path.read_bytes() == before


@pytest.mark.parametrize("action", ["list", "add"])
def test_keys_file_not_utf8_is_one_line_naming_the_file(tmp_path, capsys, action):
    # regression: `keys list` printed "'utf-8' codec can't decode byte 0xff in position 0: ..."
    path = tmp_path / "keys"
    path.write_bytes(b"read k1 " + b"0" * 64 + b"\n\xff\xfe\n")
    args = ["keys", action, "--file", str(path)] + (["--scope", "read"] if action == "add" else [])
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"lrs-rec keys: error: --file {path}: not UTF-8 text (invalid start byte at byte 73)\n"
    )
    assert path.read_bytes().endswith(b"\xff\xfe\n")  # nothing appended


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("read k1\n", ":1: expected '<scope> <key-id> <sha256-hex>', got 2 field(s)"),
        ("# c\nowner k1 " + "0" * 64 + "\n", ":2: unknown scope 'owner'"),
        ("read k/1 " + "0" * 64, ":1: key id 'k/1'"),
        ("read k1 my-plain-secret", ":1: the third field must be the 64-hex-digit SHA-256"),
        ("read k1 " + "0" * 64 + "\nwrite k1 " + "1" * 64, ":2: key id 'k1' repeats line 1"),
        ("read k1 " + "0" * 64 + "\nwrite k2 " + "0" * 64, ":2: the same secret hash as line 1"),
        ("# only a comment\n", "no keys"),
    ],
)
def test_bad_keys_file_is_one_line_naming_file_and_line(
    tmp_path, model_dir, capsys, content, message
):
    path = tmp_path / "keys"
    path.write_text(content)
    code = cli_main(["serve", "--model", str(model_dir), "--api-keys", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and message in err, err
    assert len(err.strip().splitlines()) == 1 and "my-plain-secret" not in err


def test_world_writable_or_missing_keys_file_is_refused(tmp_path, keys_file):
    keys_file.chmod(0o666)
    with pytest.raises(ValueError, match="world-writable"):
        auth.load_api_keys(keys_file)
    with pytest.raises(ValueError, match="no such file"):
        auth.load_api_keys(tmp_path / "nope")


def test_authenticate_compares_every_key(monkeypatch, keys_file):
    ring = auth.load_api_keys(keys_file)
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for secret in [SECRETS["read"], SECRETS["admin"], "nope"]:
        calls.clear()
        ring.authenticate(secret)
        assert len(calls) == len(ring.keys) == 3


# -- the bind rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("localhost", True), ("::1", True),
        ("[::1]", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
        ("192.168.1.5", False), ("example.com", False), ("", False),
    ],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert auth.is_loopback(host) is loopback


def test_serve_refuses_a_public_address_without_keys(
    model_dir, home, monkeypatch, capsys, keys_file
):
    import uvicorn

    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: ran.append(k["host"]))
    assert cli_main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0' without authentication" in err and "--api-keys" in err
    assert len(err.strip().splitlines()) == 1 and ran == []
    # --port 0: uvicorn.run is mocked, and serve now binds --port once to check it is free
    args = ["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--allow-unauthenticated", "--port", "0"]  # fmt: skip
    assert cli_main(args) == 0
    assert "WARNING: listening on 0.0.0.0 WITHOUT authentication" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(model_dir), "--host", "::", "--api-keys", str(keys_file), "--port", "0"]) == 0  # fmt: skip
    assert "WARNING" not in capsys.readouterr().err
    assert (
        cli_main(["serve", "--model", str(model_dir), "--port", "0"]) == 0
    )  # 127.0.0.1 by default
    assert ran == ["0.0.0.0", "::", "127.0.0.1"]
    # trace logging prints request headers: refused with keys
    args = [
        "serve",
        "--model",
        str(model_dir),
        "--api-keys",
        str(keys_file),
        "--log-level",
        "trace",
    ]
    assert cli_main(args) == 2
    assert "--log-level trace" in capsys.readouterr().err


def test_worker_processes_load_the_keys_too(model_dir, home, keys_file, monkeypatch):
    """`serve --workers N`: each worker builds its app from $LRS_SERVE_CONFIG, keys included."""
    import json

    from lrs_rec.serving.cmd_serve import ENV_CONFIG, app_from_env
    from lrs_rec.serving.connection import connect

    RedisStore(connect(home=home)).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    cfg = {
        "model": str(model_dir), "redis": None, "home": str(home), "max_n": 10, "threads": 1,
        "redis_timeout": 1.0, "max_body_bytes": 4096, "api_keys": str(keys_file),
    }  # fmt: skip
    monkeypatch.setenv(ENV_CONFIG, json.dumps(cfg))
    with TestClient(app_from_env()) as c:
        assert c.get("/v1/model").status_code == 401
        ok = c.get("/v1/model", headers={"Authorization": "Bearer " + SECRETS["read"]})
        assert ok.status_code == 200


@pytest.mark.parametrize("command", ["serve", "quickstart"])
def test_a_port_in_use_is_one_line_before_any_work(
    model_dir, home, tmp_path, monkeypatch, capsys, command
):
    """serve printed "listening on http://127.0.0.1:P", then uvicorn's "ERROR: [Errno 98] ...
    address already in use" (exit 3); quickstart trained and published first, then said "the HTTP
    service did not start"."""
    import socket

    import uvicorn

    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: ran.append(k))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = {
            "serve": ["serve", "--model", str(model_dir), "--port", str(port)],
            "quickstart": ["quickstart", "--home", str(tmp_path / "q"), "--port", str(port)],
        }[command]
        assert cli_main(argv) == 2
        out, err = capsys.readouterr()
        assert err == (
            f"lrs-rec {command}: error: --port {port}: cannot listen on 127.0.0.1:{port} "
            "(Address already in use)\n"
        )
        assert "listening" not in out and ran == [] and not (tmp_path / "q").exists()
        if command == "serve":  # the metrics port is checked the same way
            free = _free_port()
            argv = ["serve", "--model", str(model_dir), "--port", str(free), "--metrics-port", str(port)]  # fmt: skip
            assert cli_main(argv) == 2
            assert f"--metrics-port {port}: cannot listen" in capsys.readouterr().err


def test_quickstart_refuses_a_public_address_too(tmp_path, capsys):
    args = ["quickstart", "--home", str(tmp_path), "--host", "0.0.0.0", "--serve"]
    assert cli_main(args) == 2
    assert "refusing to listen on '0.0.0.0' without authentication" in capsys.readouterr().err
    assert not (tmp_path / "quickstart").exists()  # refused before any work


def test_metrics_on_a_separate_port(model_dir, home, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: apps.append(app))
    args = ["serve", "--model", str(model_dir), "--metrics-port", "1", "--workers", "2"]
    assert cli_main(args) == 2
    assert "--metrics-port needs --workers 1" in capsys.readouterr().err
    port = _free_port()
    assert cli_main(["serve", "--model", str(model_dir), "--metrics-port", str(port)]) == 0
    (app,) = apps
    try:
        with TestClient(app) as c:
            assert c.get("/metrics").status_code == 404  # not on the service port any more
            assert c.get("/healthz").status_code == 200
            assert "/metrics" not in c.get("/openapi.json").json()["paths"]
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'lrs_http_requests_total{method="GET",outcome="ok",route="/healthz"} 1.0' in scraped
    finally:
        app.state.metrics_server.shutdown()
        app.state.metrics_server.server_close()
