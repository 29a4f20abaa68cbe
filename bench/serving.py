"""Serving benchmark: Recommender latency vs a bare Redis GET, HTTP throughput, Redis bytes per user.

One run, one (embedded, fresh) Redis:

1. a random model (n_users x n_items, d, r, k; or ``--model MODEL_DIR``) is saved, exported to ONNX
   and published twice: without histories (-> ``redis_bytes_per_user``: INFO memory ``used_memory``
   delta / n_users, parameters only) and with histories (-> ``redis_history_bytes_per_user``);
2. interleaved, same process, same Redis: ``Recommender.recommend(user, 100)`` (top-100 over all
   items, rated items excluded), a bare redis-py ``GET`` of one user's record (a copy stored under a
   plain string key) and the ``HGET`` the Recommender really does;
3. ``lrs-rec serve`` in a subprocess on 127.0.0.1 and a small asyncio keep-alive HTTP/1.1 client with a
   fixed number of connections (bounded load) for ``--http-seconds`` against ``/v1/recommend`` and
   then the trivial ``/healthz`` of the same server; then the same at 1, 16 and 64 concurrent
   clients for users drawn uniformly and Zipf-distributed from the whole model (each draw sent
   once), each on a fresh server with the user cache on (the default) and off (``--user-cache 0``)
   (``http_by_clients_detail``: req/s and p50/p99 of both endpoints, server CPU per request, the
   cache's hit rate, and recommend's share of the constant endpoint's req/s; target >= 0.8;
   ``http_by_clients``: the uniform, cache-on cells);
4. Redis paused (SIGSTOP of the embedded redis-server for ``--pause-seconds``) while 16 clients ask
   for recommendations: latency of ``/healthz`` meanwhile and what the Redis-bound requests got
   (``redis_paused``; target: /healthz <= 50 ms, recommend 503 within the Redis timeout).

``python bench/serving.py --json`` prints one JSON object; results go to docs/results/serving.json
and docs/img/serving_latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


_PORTS: list[int] = []  # --ports LO-HI: take the servers' ports from this range


def _free_port() -> int:
    if _PORTS:
        while _PORTS:
            port = _PORTS.pop(0)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError("--ports: no free port left in the range")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _LoadClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the closed-loop load: sends the next request when the
    previous answer is complete (status line, ``content-length`` header, body). Raw bytes on an
    asyncio protocol — no stream objects, no header dictionaries — so that the client, which
    shares the machine's two cores with the server and Redis, costs little and the same for every
    endpoint (its CPU per request is reported as ``client_cpu_us``)."""

    def __init__(
        self,
        requests: list[bytes],
        offset: int,
        stop: float,
        out: dict[str, Any],
        cursor: list[int] | None = None,
    ):
        self.requests, self.k, self.stop, self.out = requests, offset, stop, out
        self.cursor = cursor  # shared by all clients (and calls): each request of the list once
        self.buf = b""
        self.t = 0.0
        self.transport: Any = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.t = time.perf_counter()
        if self.cursor is not None:
            self.transport.write(self.requests[self.cursor[0] % len(self.requests)])
            self.cursor[0] += 1
            return
        self.transport.write(self.requests[self.k % len(self.requests)])
        self.k += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            at = buf.find(b"content-length:", 0, end)
            if at < 0:
                at = buf.lower().find(b"content-length:", 0, end)
            length = int(buf[at + 15 : buf.find(b"\r\n", at)]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            now = time.perf_counter()
            self.out["latencies"].append(now - self.t)
            if not buf.startswith(b"HTTP/1.1 200"):
                self.out["errors"] += 1
            buf = buf[end + 4 + length :]
            if now < self.stop:
                self._send()
            else:
                self.transport.close()
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _http_load(
    port: int,
    request: bytes | list[bytes],
    *,
    connections: int,
    seconds: float,
    cursor: list[int] | None = None,
) -> tuple[int, list[float], int]:
    """Closed-loop load: ``connections`` keep-alive clients (:class:`_LoadClient`), each sending
    the next request when the previous answer is in (cycling through ``request`` when it is a
    list, each connection from its own offset; with ``cursor``, all connections take the next
    request of the list in turn, continuing where the last call stopped) for ``seconds``."""
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"latencies": [], "errors": 0}
    stop = time.perf_counter() + seconds
    requests = request if isinstance(request, list) else [request]
    clients = []
    for i in range(connections):
        _, client = await loop.create_connection(
            lambda i=i: _LoadClient(requests, 97 * i, stop, out, cursor), "127.0.0.1", port
        )
        clients.append(client)
    await asyncio.gather(*(c.done for c in clients))
    return len(out["latencies"]), out["latencies"], out["errors"]


def _compare(
    port: int,
    pid: int,
    endpoints: dict[str, list[bytes]],
    clients: int,
    seconds: float,
    rounds: int,
    cursor: list[int],
) -> dict[str, float]:
    """recommend vs the constant endpoint with ``clients`` closed-loop clients, alternating in
    ``rounds`` slices of ``seconds / rounds`` each: req/s, p50/p99, server and client CPU per
    request, and the user cache's hit rate over the recommend slices. The recommend requests are
    taken in turn from the list, continuing at ``cursor`` (each draw of a user once)."""
    row: dict[str, float] = {}
    acc: dict[str, tuple[int, list[float], int, float, float]] = {
        key: (0, [], 0, 0.0, 0.0) for key in endpoints
    }
    for key, req in endpoints.items():  # warm-up
        c = cursor if key == "recommend" else None
        asyncio.run(_http_load(port, req, connections=clients, seconds=0.3, cursor=c))
    hits, misses = 0.0, 0.0
    for _ in range(rounds):
        for key, req in endpoints.items():
            if key == "recommend":
                h0, m0 = _cache_lookups(port)
            cpu, own = _cpu_seconds(pid), time.process_time()
            n, lat, errors = asyncio.run(
                _http_load(
                    port,
                    req,
                    connections=clients,
                    seconds=seconds / rounds,
                    cursor=cursor if key == "recommend" else None,
                )
            )
            used, own = _cpu_seconds(pid) - cpu, time.process_time() - own
            if key == "recommend":
                h1, m1 = _cache_lookups(port)
                hits, misses = hits + h1 - h0, misses + m1 - m0
            a = acc[key]
            acc[key] = (a[0] + n, a[1] + lat, a[2] + errors, a[3] + used, a[4] + own)
    for key, (n, lat, errors, used, own) in acc.items():
        row[f"{key}_rps"] = round(n / seconds, 1)
        row[f"{key}_p50_ms"] = round(_pct(lat, 50) * 1e3, 3)
        row[f"{key}_p99_ms"] = round(_pct(lat, 99) * 1e3, 3)
        row[f"{key}_errors"] = errors
        # the server's own CPU per request: less sensitive to a busy machine than req/s
        row[f"{key}_server_cpu_us"] = round(used / max(n, 1) * 1e6, 1)
        row[f"{key}_client_cpu_us"] = round(own / max(n, 1) * 1e6, 1)  # the load generator's
    row["recommend_over_constant_rps"] = round(row["recommend_rps"] / row["constant_rps"], 3)
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)  # the machine's load when the cell ended
    if hits + misses:
        row["cache_hit_rate"] = round(hits / (hits + misses), 3)
    return row


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_idle(pid: int, *, limit: float = 300.0) -> float:
    """Seconds until process ``pid`` uses < 5 % of a core over half a second (or ``limit``)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        cpu = _cpu_seconds(pid)
        time.sleep(0.5)
        if _cpu_seconds(pid) - cpu < 0.025:
            break
    return round(time.perf_counter() - t0, 1)


async def _status_of(port: int, request: bytes, timeout: float) -> tuple[int, float]:
    """One request on a new connection: (status, seconds); status 0 if no answer in ``timeout``."""
    t = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        finally:
            writer.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return 0, time.perf_counter() - t
    return int(head.split(b" ", 2)[1]), time.perf_counter() - t


async def _paused_redis(
    port: int, pid: int, recommend: list[bytes], *, seconds: float, clients: int
) -> dict[str, Any]:
    """SIGSTOP the redis-server ``pid`` for ``seconds`` while ``clients`` loops ask for
    recommendations; probe /healthz every 20 ms meanwhile; SIGCONT; time until recommend is 200."""
    import signal

    health: list[float] = []
    answers: list[tuple[int, float]] = []
    os.kill(pid, signal.SIGSTOP)
    stop = time.perf_counter() + seconds
    try:

        async def client(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                answers.append(await _status_of(port, recommend[k % len(recommend)], 30))
                k += 1

        async def prober() -> None:
            while time.perf_counter() < stop:
                status, took = await _status_of(port, _get("/healthz"), 30)
                health.append(took if status == 200 else float("inf"))
                await asyncio.sleep(0.02)

        await asyncio.gather(prober(), *(client(i) for i in range(clients)))
    finally:
        os.kill(pid, signal.SIGCONT)
    t = time.perf_counter()
    while (await _status_of(port, recommend[0], 30))[0] != 200 and time.perf_counter() - t < 30:
        await asyncio.sleep(0.01)
    recovered = time.perf_counter() - t
    statuses = [s for s, _ in answers]
    return {
        "pause_seconds": seconds,
        "clients": clients,
        "healthz_probes": len(health),
        "healthz_p50_ms": round(_pct(health, 50) * 1e3, 2),
        "healthz_max_ms": round(max(health) * 1e3, 2),
        "recommend_answers": len(answers),
        "recommend_503": statuses.count(503),
        "recommend_other": len(statuses) - statuses.count(503),
        "recommend_503_max_s": round(max((d for s, d in answers if s == 503), default=0.0), 3),
        "recovered_after_resume_s": round(recovered, 3),
    }


async def _asgi_overhead(rec: Any, user_id: str, top_n: int, *, n: int) -> dict[str, float]:
    """p50 of /healthz and /v1/recommend called as ASGI apps in-process (no socket, no uvicorn), next
    to the library call: what the HTTP layer itself adds."""
    from lrs_rec.serving.app import create_app

    app = create_app(rec)
    body = json.dumps({"user_id": user_id, "n": top_n, "exclude_rated": True}).encode()

    async def call(method: str, path: str, data: bytes) -> None:
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "http_version": "1.1",
            "scheme": "http",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1),
            "app": app,
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"{path} answered {message['status']}")

        await app(scope, receive, send)

    res: dict[str, float] = {}
    for key, method, path, data in (
        ("asgi_healthz", "GET", "/healthz", b""),
        ("asgi_recommend", "POST", "/v1/recommend", body),
    ):
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            await call(method, path, data)
            xs.append(time.perf_counter() - t)
        res[f"{key}_p50_us"] = round(_pct(xs, 50) * 1e6, 1)
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        rec.recommend(user_id, top_n)
        xs.append(time.perf_counter() - t)
    res["asgi_library_recommend_p50_us"] = round(_pct(xs, 50) * 1e6, 1)
    return res


def _start_server(model_dir: Path, home: Path, port: int, extra: list[str]) -> Any:
    """``lrs-rec serve`` on 127.0.0.1:``port`` against the embedded Redis of ``home``."""
    from lrs_rec.serving.connection import embedded_socket

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrs_rec.serving.cli",
            "serve",
            "--model",
            str(model_dir),
            "--redis",
            f"unix://{embedded_socket(home)}",
            "--port",
            str(port),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("lrs-rec serve did not start") from None
            time.sleep(0.1)
    return proc


def _cache_lookups(port: int) -> tuple[float, float]:
    """(hits, misses) of the server's user cache so far, from /metrics (0, 0 without a cache)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    found = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("lrs_user_cache_lookups_total{"):
            key = "hit" if 'result="hit"' in line else "miss"
            found[key] = float(line.rsplit(" ", 1)[1])
    return found["hit"], found["miss"]


def _rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of process ``pid`` in MB (Linux /proc)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def _user_draws(n_users: int, count: int, dist: str, rng: random.Random, s: float) -> list[int]:
    """``count`` user positions: uniform over all users, or Zipf (the user of popularity rank r
    drawn with probability ∝ 1 / r^s; ranks assigned to users at random)."""
    if dist == "uniform":
        return [rng.randrange(n_users) for _ in range(count)]
    weights = 1.0 / np.arange(1, n_users + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights / weights.sum())
    ranks = np.searchsorted(cdf, [rng.random() for _ in range(count)], side="right")
    ranks = np.minimum(ranks, n_users - 1)
    order = list(range(n_users))
    random.Random(rng.random()).shuffle(order)
    return [order[int(r)] for r in ranks]


def _post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=1682)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sparsity", type=int, default=8)
    p.add_argument("--ratings-per-user", type=int, default=20)
    p.add_argument("--model", default=None, help="benchmark this model directory instead")
    p.add_argument("--precision", choices=("float16", "float32"), default="float16")
    p.add_argument("--top-n", type=int, default=100)
    p.add_argument("--requests", type=int, default=5000, help="latency samples per method")
    p.add_argument("--http-seconds", type=float, default=4.0)
    p.add_argument("--http-connections", type=int, default=4)
    p.add_argument(
        "--http-clients",
        default="1,16,64",
        help="concurrent clients of the recommend vs constant endpoint comparison",
    )
    p.add_argument(
        "--http-users",
        type=int,
        default=100_000,
        help="recommend requests go through this many draws of users from the whole model "
        "(uniform, and Zipf), each draw once (then from the start again)",
    )
    p.add_argument(
        "--zipf-s",
        type=float,
        default=1.1,
        help="exponent of the skewed (Zipf) user distribution of the recommend requests",
    )
    p.add_argument("--pause-seconds", type=float, default=3.0, help="0: no Redis pause")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ml100k",
        default=None,
        metavar="DIR",
        help="also train on DIR/u1.base and report the served RMSE on u1.test with "
        "float16 vs float32 records",
    )
    p.add_argument(
        "--ports",
        default=None,
        metavar="LO-HI",
        help="bind the lrs-rec serve processes to ports of this range (default: any free port)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-write", action="store_true", help="do not write docs/ results")
    args = p.parse_args(argv)
    if args.ports:
        lo, _, hi = args.ports.partition("-")
        _PORTS[:] = range(int(lo), int(hi or lo) + 1)

    sys.path.insert(0, str(ROOT))
    from lrs_rec.serving.connection import connect, stop_embedded
    from lrs_rec.serving.recommender import Recommender
    from lrs_rec.serving.store import RedisStore
    from lrs_rec.training.export import export_model_dir
    from lrs_rec.training.testing import random_trained_model, write_model_dir

    from lrs_rec.model_dir import ONNX, load_model_dir

    load_at_start = round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="lrs-bench-"))
    home = tmp / "home"
    if args.model:
        model_dir = Path(args.model)
        if not (model_dir / ONNX).is_file():
            export_model_dir(model_dir)
        model = load_model_dir(model_dir)
    else:
        model_dir = tmp / "model"
        log(
            f"building a random model: {args.users} users x {args.items} items, d={args.d}, "
            f"r={args.rank}, k={args.sparsity}"
        )
        model = write_model_dir(
            random_trained_model(
                n_users=args.users,
                n_items=args.items,
                d=args.d,
                rank=args.rank,
                sparsity=args.sparsity,
                ratings_per_user=args.ratings_per_user,
                random_state=args.seed,
            ),
            model_dir,
        )
    out: dict[str, Any] = {
        "n_users": model.n_users,
        "n_items": model.n_items,
        "d": model.lrs.d,
        "rank": model.lrs.rank,
        "sparsity": model.lrs.sparsity,
        "precision": args.precision,
        "top_n": args.top_n,
    }
    proc = None
    try:
        handle = connect(None, home=home, socket_timeout=120.0, connect_timeout=5.0)
        store = RedisStore(handle)
        store.r.ping()
        # -- memory ------------------------------------------------------------------------------
        m0 = store.used_memory()
        t = time.perf_counter()
        v1 = store.publish(model, precision=args.precision, with_history=False, switch=False)
        out["publish_seconds_params_only"] = round(time.perf_counter() - t, 3)
        m1 = store.used_memory()
        t = time.perf_counter()
        v2 = store.publish(model, model_dir=str(model_dir), precision=args.precision)
        out["publish_seconds_with_history"] = round(time.perf_counter() - t, 3)
        m2 = store.used_memory()
        out["record_bytes"] = v1.record_format.size
        out["bucket_size"] = v1.bucket_size
        out["redis_bytes_per_user"] = round((m1 - m0) / model.n_users, 2)
        out["redis_history_bytes_per_user"] = round((m2 - m1 - (m1 - m0)) / model.n_users, 2)
        out["mean_history_length"] = round(float(np.mean(np.diff(model.history_indptr))), 2)
        out["bucket_encoding"] = store.r.object("encoding", store.keys.params(v2.version, 0))
        out["bucket_encoding"] = out["bucket_encoding"].decode()
        store.delete_version(v1.version)
        log(
            f"memory: {out['redis_bytes_per_user']} B/user (params), "
            f"{out['redis_history_bytes_per_user']} B/user (history)"
        )

        # -- library latency vs bare GET ----------------------------------------------------------
        rec = Recommender(model_dir, home=home)
        r = rec.store.r
        rng = random.Random(args.seed)
        users = [model.user_ids[rng.randrange(model.n_users)] for _ in range(args.requests)]
        probe_loc = rec.store.locate(v2, users[0], model.user_index()[users[0]])
        record = r.hget(probe_loc.params_key, probe_loc.field)
        r.set(b"bench:record", record)
        for u in users[:200]:  # warm-up
            rec.recommend(u, args.top_n)
            r.get(b"bench:record")
        rec_t, get_t, hget_t, score_t = [], [], [], []
        index = model.user_index()
        item_ids = list(model.item_ids[:10])
        pc = time.perf_counter
        for u in users:
            t = pc()
            r.get(b"bench:record")
            get_t.append(pc() - t)
            t = pc()
            rec.recommend(u, args.top_n)
            rec_t.append(pc() - t)
            loc = rec.store.locate(v2, u, index[u])
            t = pc()
            r.hget(loc.params_key, loc.field)
            hget_t.append(pc() - t)
            t = pc()
            rec.score(u, item_ids)
            score_t.append(pc() - t)
        for name, xs in (
            ("recommend", rec_t),
            ("redis_get", get_t),
            ("redis_hget", hget_t),
            ("score10", score_t),
        ):
            out[f"{name}_p50_us"] = round(_pct(xs, 50) * 1e6, 1)
            out[f"{name}_p99_us"] = round(_pct(xs, 99) * 1e6, 1)
        out["recommend_p99_over_get_p99"] = round(
            out["recommend_p99_us"] / out["redis_get_p99_us"], 3
        )
        log(
            f"recommend p50/p99 {out['recommend_p50_us']}/{out['recommend_p99_us']} us, "
            f"GET p50/p99 {out['redis_get_p50_us']}/{out['redis_get_p99_us']} us"
        )

        # -- HTTP layer cost in-process (ASGI call, no socket) ----------------------------------
        out.update(
            asyncio.run(_asgi_overhead(rec, users[0], args.top_n, n=min(args.requests, 2000)))
        )

        # -- HTTP ---------------------------------------------------------------------------------
        port = _free_port()
        proc = _start_server(model_dir, home, port, [])
        many = [
            _post("/v1/recommend", {"user_id": u, "n": args.top_n, "exclude_rated": True})
            for u in users
        ]
        for path, req, key in (
            ("/v1/recommend", many, "http"),
            ("/healthz", [_get("/healthz")], "http_trivial"),
        ):
            asyncio.run(_http_load(port, req, connections=args.http_connections, seconds=0.5))
            n, lat, errors = asyncio.run(
                _http_load(port, req, connections=args.http_connections, seconds=args.http_seconds)
            )
            out[f"{key}_rps"] = round(n / args.http_seconds, 1)
            out[f"{key}_p50_ms"] = round(_pct(lat, 50) * 1e3, 3)
            out[f"{key}_p99_ms"] = round(_pct(lat, 99) * 1e3, 3)
            out[f"{key}_errors"] = errors
            log(f"HTTP {path}: {out[f'{key}_rps']} req/s, p99 {out[f'{key}_p99_ms']} ms")
        out["http_connections"] = args.http_connections
        out["http_seconds"] = args.http_seconds
        # recommend next to the constant endpoint, at several client counts, for two user
        # distributions, with the server's user cache on (the default) and off (a second server,
        # --user-cache 0). Users are drawn from the whole population: every miss reads a record
        # and a history from Redis, every request is scored anew (no answer is cached).
        http_rng = random.Random(args.seed + 1)
        requests: dict[str, list[bytes]] = {}
        for dist in ("uniform", "zipf"):
            draws = _user_draws(model.n_users, args.http_users, dist, http_rng, args.zipf_s)
            requests[dist] = [
                _post(
                    "/v1/recommend",
                    {"user_id": model.user_ids[u], "n": args.top_n, "exclude_rated": True},
                )
                for u in draws
            ]
            out[f"http_{dist}_distinct_users"] = len(set(draws))
        recs = requests["uniform"]
        out["http_users"] = args.http_users
        out["zipf_s"] = args.zipf_s
        rounds = 4  # the two endpoints alternate in short slices: a busy machine hits both alike
        detail: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        rss: dict[str, dict[str, float]] = {}
        for dist in ("uniform", "zipf"):
            # fresh servers per distribution (an empty cache): cache on (the default) and off
            servers: dict[str, tuple[int, Any]] = {}
            try:
                for mode, extra in (("cache_on", []), ("cache_off", ["--user-cache", "0"])):
                    p_ = _free_port()
                    servers[mode] = (p_, _start_server(model_dir, home, p_, extra))
                # they build the onboarding prior in the background when they start: let them
                idle = max(_wait_idle(srv.pid) for _, srv in servers.values())
                out.setdefault("server_idle_after_s", {})[dist] = idle
                for mode, (srv_port, srv) in servers.items():
                    cells = detail.setdefault(dist, {}).setdefault(mode, {})
                    endpoints = {"recommend": requests[dist], "constant": [_get("/healthz")]}
                    cursor = [0]  # both servers get the same sequence of users
                    for clients in (int(c) for c in args.http_clients.split(",")):
                        cells[str(clients)] = _compare(
                            srv_port, srv.pid, endpoints, clients, args.http_seconds, rounds, cursor
                        )
                        row = cells[str(clients)]
                        log(
                            f"{dist}, {mode}, {clients} clients: recommend {row['recommend_rps']} "
                            f"req/s (p99 {row['recommend_p99_ms']} ms, cache hits "
                            f"{row.get('cache_hit_rate', '-')}), constant {row['constant_rps']} "
                            f"req/s: {row['recommend_over_constant_rps']}x"
                        )
                    sent = out.setdefault("http_recommend_requests_sent", {})
                    sent.setdefault(dist, {})[mode] = cursor[0]
                    rss[f"{dist}_{mode}"] = _rss_mb(srv.pid)
            finally:
                for _, srv in servers.values():
                    srv.terminate()
                    srv.wait(10)
        out["server_rss_mb"] = rss
        out["http_by_clients_detail"] = detail
        # the headline (issue 16's key): the default server (cache on), users drawn uniformly
        by_clients = detail["uniform"]["cache_on"]
        out["http_by_clients"] = by_clients
        if args.pause_seconds > 0:
            pid = int(store.r.info("server")["process_id"])
            out["redis_paused"] = asyncio.run(
                _paused_redis(port, pid, recs, seconds=args.pause_seconds, clients=16)
            )
            out["redis_paused"]["redis_timeout_s"] = 1.0  # lrs-rec serve --redis-timeout default
            log(f"Redis paused: {out['redis_paused']}")
        out["targets"] = {
            "recommend_p99_le_1.5x_get_p99": out["recommend_p99_over_get_p99"] <= 1.5,
            "redis_bytes_per_user_le_64": out["redis_bytes_per_user"] <= 64,
            "recommend_ge_0.8x_constant_rps_at_16_and_64_clients": all(
                row["recommend_over_constant_rps"] >= 0.8
                for clients, row in by_clients.items()
                if int(clients) >= 16
            ),
            "recommend_ge_0.8x_constant_rps_at_every_level": all(
                row["recommend_over_constant_rps"] >= 0.8 for row in by_clients.values()
            ),
        }
        if "redis_paused" in out:
            out["targets"]["healthz_le_50ms_while_redis_paused"] = (
                out["redis_paused"]["healthz_max_ms"] <= 50
            )
        out["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1m_at_start": load_at_start,
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        }
        rec.close()
        if args.ml100k:
            out.update(_ml100k_precision(Path(args.ml100k), tmp, home))
        if not args.no_write:
            _write(out, rec_t, get_t, hget_t)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        stop_embedded(home, save=False)
        shutil.rmtree(tmp, ignore_errors=True)  # the random model and the embedded Redis's files
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


def _ml100k_precision(data: Path, tmp: Path, home: Path) -> dict[str, Any]:
    """Train on u1.base, publish with float16 and with float32 records, score u1.test through the
    served path (Recommender.score_batch, one ONNX run per user) and compare RMSEs."""
    from lrs_rec.serving.connection import connect
    from lrs_rec.serving.recommender import Recommender
    from lrs_rec.serving.store import RedisStore
    from lrs_rec.training.config import TrainConfig
    from lrs_rec.training.export import export_model_dir
    from lrs_rec.training.loaders import load_ratings
    from lrs_rec.training.pipeline import train

    from lrs_rec.model_dir import save_model_dir

    log("ML-100K u1: training on u1.base")
    model_dir = tmp / "ml100k_u1"
    trained = train(load_ratings(data / "u1.base"), TrainConfig(), progress=False).model
    model = save_model_dir(trained, model_dir)
    export_model_dir(model_dir)
    test = load_ratings(data / "u1.test")
    item_index, user_index = model.item_index(), model.user_index()
    known = np.array([i in item_index for i in test.items])
    users, items, ratings = test.users[known], test.items[known], test.ratings[known]
    offline = model.predict(
        np.array([user_index.get(u, -1) for u in users]), np.array([item_index[i] for i in items])
    )
    res: dict[str, Any] = {
        "ml100k_u1_n_test": int(known.sum()),
        "ml100k_u1_n_test_unknown_item_skipped": int((~known).sum()),
        "ml100k_u1_rmse_offline": round(float(np.sqrt(np.mean((offline - ratings) ** 2))), 7),
        "ml100k_u1_dims": model.manifest["dims"],
    }
    store = RedisStore(connect(None, home=home, socket_timeout=120.0))
    by_user: dict[str, list[int]] = {}
    for j, u in enumerate(users):
        by_user.setdefault(str(u), []).append(j)
    uids = list(by_user)
    for precision in ("float16", "float32"):
        store.publish(model, model_dir=str(model_dir), precision=precision)
        rec = Recommender(model_dir, home=home, version_refresh_interval=0)
        served = np.empty(ratings.size)
        results = rec.score_batch(uids, [[str(items[j]) for j in by_user[u]] for u in uids])
        for u, r in zip(uids, results, strict=True):
            served[by_user[u]] = r.scores
        rec.close()
        rmse = float(np.sqrt(np.mean((served - ratings) ** 2)))
        res[f"ml100k_u1_rmse_served_{precision}"] = round(rmse, 7)
        res[f"ml100k_u1_max_abs_diff_{precision}_vs_offline"] = float(
            np.max(np.abs(served - offline))
        )
    log(
        f"ML-100K u1 RMSE: offline {res['ml100k_u1_rmse_offline']}, served float16 "
        f"{res['ml100k_u1_rmse_served_float16']}, float32 {res['ml100k_u1_rmse_served_float32']}"
    )
    return res


def _write(
    out: dict[str, Any], rec_t: list[float], get_t: list[float], hget_t: list[float]
) -> None:
    results = ROOT / "docs" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "serving.json").write_text(json.dumps(out, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, xs in (
        ("Recommender.recommend (top-100)", rec_t),
        ("bare GET", get_t),
        ("HGET (record fetch)", hget_t),
    ):
        v = np.sort(np.asarray(xs) * 1e6)
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(
        f"{out['n_users']} users, {out['n_items']} items, r={out['rank']}, k={out['sparsity']}"
    )
    ax.axhline(0.99, color="grey", lw=0.5, ls="--")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "serving_latency.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
