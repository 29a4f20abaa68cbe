"""The fast lane of score and recommend (``serving.fast_lane``) against its slow reference twin, the
same app without the lane (``create_app(..., fast_lane=False)``: the FastAPI routes and the whole
middleware stack): for valid and invalid requests both answer the same status, headers and body
bytes, count the same metrics, and the lane answers the plain requests itself (else it would test
nothing). Driven in-process as ASGI apps, on a real embedded Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from lrs_rec.serving import auth
from lrs_rec.serving.app import create_app
from lrs_rec.serving.async_front import AsyncFront
from lrs_rec.serving.connection import connect
from lrs_rec.serving.encoding import RecordError
from lrs_rec.serving.guards import RequestGuardMiddleware, ServeLimits
from lrs_rec.serving.recommender import NotReadyError, Recommender, StoreUnavailableError
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import write_random_model_dirs

from lrs_rec.ids import MAX_ID_LENGTH
from lrs_rec.model_dir import load_model_dir

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

SECRETS = {"read": "r-" + "a" * 40, "write": "w-" + "b" * 40, "admin": "adm-" + "c" * 40}
LIMIT = 4096  # max_body_bytes of the apps under test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    dirs = write_random_model_dirs(
        tmp_path_factory.mktemp("lane"), {"a": 3},
        n_users=80, n_items=40, d=16, rank=4, sparsity=4, ratings_per_user=6,
    )  # fmt: skip
    return dirs["a"]


@pytest.fixture
def rec(model_dir, home) -> Recommender:
    RedisStore(connect(home=home)).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    return Recommender(model_dir, home=home)


def _apps(rec: Recommender, **kw: Any) -> tuple[Any, Any]:
    """(the app with its fast lanes, the same app without them)."""
    kw.setdefault("max_body_bytes", LIMIT)
    return create_app(rec, **kw), create_app(rec, fast_lane=False, **kw)


def _lane_counts(app: Any) -> tuple[int, int]:
    lanes = app.fast_lanes.values()
    return sum(x.answered for x in lanes), sum(x.fallbacks for x in lanes)


async def _call(
    app: Any,
    method: str,
    path: str,
    chunks: Sequence[bytes] | None = (b"",),
    headers: Sequence[tuple[bytes, bytes]] | None = None,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request as uvicorn would pass it: the body in ``chunks`` (None: it never arrives; a last
    chunk None: the rest never arrives; an empty list: the client disconnects). Content-Length is
    added unless ``headers`` are given."""
    body = b"".join(c for c in chunks or () if c is not None)
    if headers is None:
        headers = [(b"content-type", b"application/json")]
        if method in ("POST", "PUT"):
            headers.append((b"content-length", b"%d" % len(body)))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    pending: list[dict[str, Any]] | None = None
    if chunks is not None:
        pending = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
            if c is not None
        ]
        if not chunks:
            pending = [{"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)  # a body that never comes / waiting for a disconnect
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if not sent:
        return 0, [], b""
    start, *rest = sent
    return start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in rest)


def _same(lane_app: Any, ref_app: Any, *args: Any, **kw: Any) -> tuple[int, Any, bytes]:
    async def both() -> tuple[Any, Any]:
        return await _call(lane_app, *args, **kw), await _call(ref_app, *args, **kw)

    got, want = asyncio.run(both())
    assert got == want, (args, got, want)
    return got


def _metrics(app: Any) -> list[str]:
    """The request and personalized counters and the latency histogram's counts of /metrics."""
    text = app.state.metrics.render().decode()
    keep = ("lrs_http_requests_total{", "lrs_personalized_responses_total{")
    keep_count = "lrs_http_request_duration_seconds_count{"
    return sorted(line for line in text.splitlines() if line.startswith((*keep, keep_count)))


def _body(**fields: Any) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


def test_valid_requests_are_answered_by_the_lane_with_the_reference_bytes(rec, model_dir):
    lane, ref = _apps(rec)
    users = list(load_model_dir(model_dir).user_ids[:6])
    items = list(load_model_dir(model_dir).item_ids[:5])
    requests = []
    for u in [*users, "never-seen-user", "ユーザー"]:
        requests += [
            ("/v1/recommend", _body(user_id=u)),
            ("/v1/recommend", _body(user_id=u, n=3, exclude_rated=False)),
            ("/v1/recommend", _body(user_id=u, n=rec.max_n, exclude_rated=True)),
            ("/v1/score", _body(user_id=u, item_ids=items)),
            ("/v1/score", _body(user_id=u, item_ids=[])),
            ("/v1/score", _body(user_id=u, item_ids=[items[0], "no-such-item"])),
        ]
    for path, body in requests:
        status, headers, _ = _same(lane, ref, "POST", path, [body])
        assert status == 200
        assert dict(headers)[b"content-type"] == b"application/json"
    # a body in several chunks is read whole
    body = _body(user_id=users[0], n=4)
    _same(lane, ref, "POST", "/v1/recommend", [body[:5], body[5:9], body[9:]])
    assert _lane_counts(lane) == (len(requests) + 1, 0)  # all answered by the lane itself
    assert _lane_counts(ref) == (0, 0)
    assert _metrics(lane) == _metrics(ref)
    assert any('route="/v1/recommend"' in line and "ok" in line for line in _metrics(lane))


INVALID = [
    b"",
    b"{",
    b"null",
    b"[]",
    b"{}",
    b'{"user_id": ""}',
    b'{"user_id": 7}',
    b'{"user_id": "u", "n": 0}',
    b'{"user_id": "u", "n": 1001}',
    b'{"user_id": "u", "n": 10.0}',
    b'{"user_id": "u", "n": true}',
    b'{"user_id": "u", "exclude_rated": 1}',
    b'{"user_id": "u", "extra": 1}',
    b'{"user_id": "a", "user_id": "b"}',
    b'{"user_id": "a", "user\\u005fid": "b"}',
    b'{"user_id": "a\\u0000b"}',
    b'{"user_id": "a\\nb"}',
    b'{"user_id": "\\ufffd"}',
    b'{"user_id": "' + b"u" * (MAX_ID_LENGTH + 1) + b'"}',
    b'{"user_id": "u"} {}',
    b"\xff\xfe",
]
INVALID_SCORE = [
    b"{}",
    b'{"user_id": "u"}',
    b'{"user_id": "u", "item_ids": "i1"}',
    b'{"user_id": "u", "item_ids": [1]}',
    b'{"user_id": "u", "item_ids": [], "item_ids": []}',
    b'{"user_id": "a\\u0001", "item_ids": []}',
    b'{"user_id": "u", "item_ids": [], "n": 3}',
]


def test_invalid_requests_get_the_reference_answers(rec):
    lane, ref = _apps(rec)
    for body in INVALID:
        status, _, answer = _same(lane, ref, "POST", "/v1/recommend", [body])
        assert status == 422, (body, answer)
    for body in [*INVALID, *INVALID_SCORE]:
        status, _, answer = _same(lane, ref, "POST", "/v1/score", [body])
        assert status == 422, (body, answer)
    # too many item ids
    many = _body(user_id="u", item_ids=["i"] * (rec.max_items + 1))
    big_lane, big_ref = _apps(rec, max_body_bytes=1 << 20)
    assert _same(big_lane, big_ref, "POST", "/v1/score", [many])[0] == 422
    # other methods on the lanes' paths, and /healthz, are not the lanes' business
    for method in ("GET", "PUT", "HEAD"):
        assert _same(lane, ref, method, "/v1/recommend")[0] == 405
    assert _same(lane, ref, "GET", "/healthz")[0] == 200
    answered, fallbacks = _lane_counts(lane)
    assert answered == 0 and fallbacks == len(INVALID) * 2 + len(INVALID_SCORE)
    assert _metrics(lane) == _metrics(ref)


def test_unknown_items_in_error_mode_answer_422_like_the_route(model_dir, home):
    RedisStore(connect(home=home)).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    rec = Recommender(model_dir, home=home, unknown_items="error")
    lane, ref = _apps(rec)
    item = load_model_dir(model_dir).item_ids[0]
    body = _body(user_id="u", item_ids=[item, "nope", "also-nope"])
    status, _, answer = _same(lane, ref, "POST", "/v1/score", [body])
    assert status == 422 and json.loads(answer)["unknown_item_ids"] == ["nope", "also-nope"]
    assert _lane_counts(lane) == (1, 0)
    assert _metrics(lane) == _metrics(ref)


def test_body_limits_framing_and_disconnects_match(rec):
    lane, ref = _apps(rec)
    ok = _body(user_id="u1", n=2)
    big = b'{"user_id": "' + b"u" * LIMIT + b'"}'
    cases: list[tuple[Any, Any]] = [
        ([big], None),  # 413 by Content-Length
        ([ok[:4], big], [(b"content-length", b"20")]),  # more than announced, over the limit
        ([ok], [(b"content-length", b"%d" % len(ok)), (b"transfer-encoding", b"chunked")]),
        ([ok], [(b"transfer-encoding", b"chunked")]),  # chunked, under the limit: 200
        ([big[:3000], big[3000:]], [(b"transfer-encoding", b"chunked")]),  # chunked, over: 413
        ([ok], [(b"content-length", b"%d" % len(ok))] * 2),
        ([ok], [(b"content-length", b"x")]),
        ([ok], []),  # no Content-Length at all
        ([], None),  # the client went away before its body
        ([ok[:5], b""], [(b"content-length", b"%d" % len(ok))]),  # shorter than announced
    ]
    statuses = [_same(lane, ref, "POST", "/v1/recommend", c, headers=h)[0] for c, h in cases]
    assert statuses[:5] == [413, 413, 400, 200, 413]
    assert statuses[8] == 0  # nothing sent to a client that left
    assert _metrics(lane) == _metrics(ref)


def test_body_timeout_answers_408_like_the_guard(rec):
    limits = ServeLimits(body_timeout=0.2, user_cache=0)
    lane, ref = _apps(rec, limits=limits)
    headers = [(b"content-length", b"30")]
    status, got_headers, body = _same(lane, ref, "POST", "/v1/recommend", None, headers=headers)
    assert status == 408 and (b"connection", b"close") in got_headers
    assert json.loads(body) == {"error": "request body not received within 0.2 s"}
    # the first chunk arrived, the rest never does
    status, _, _ = _same(lane, ref, "POST", "/v1/recommend", [b'{"user_id"', None], headers=headers)
    assert status == 408
    assert _lane_counts(lane) == (2, 0)
    assert _metrics(lane) == _metrics(ref)
    assert any("client_error" in line for line in _metrics(lane))


def test_redis_trouble_and_internal_errors_match(rec, monkeypatch):
    lane, ref = _apps(rec)
    body = _body(user_id="u1", n=3)
    score = _body(user_id="u1", item_ids=[])
    for exc in (
        StoreUnavailableError("Redis unavailable: Timeout reading from socket"),
        NotReadyError("no published version"),
    ):

        async def fail(*_: Any, exc: Exception = exc) -> Any:
            raise exc

        monkeypatch.setattr(AsyncFront, "recommend_top", fail)
        monkeypatch.setattr(AsyncFront, "score", fail)
        for path, b in (("/v1/recommend", body), ("/v1/score", score)):
            status, headers, answer = _same(lane, ref, "POST", path, [b])
            assert status == 503 and (b"retry-after", b"1") in headers
            assert json.loads(answer) == {"error": str(exc)}
    answered, fallbacks = _lane_counts(lane)
    assert (answered, fallbacks) == (4, 0)  # 503s without a second try

    # anything else: the reference route answers (and logs) it — the lane's request is redone there
    async def corrupt(*_: Any) -> Any:
        raise RecordError("bad checksum")

    monkeypatch.setattr(AsyncFront, "recommend_top", corrupt)
    status, _, answer = _same(lane, ref, "POST", "/v1/recommend", [body])
    assert status == 500 and b"stored record is corrupt" in answer
    assert _lane_counts(lane) == (4, 1)
    assert _metrics(lane) == _metrics(ref)


def _guard(app: Any) -> RequestGuardMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, RequestGuardMiddleware):
        layer = layer.app
    return layer


def test_in_flight_limit_is_shared_with_the_guard(rec):
    lane, ref = _apps(rec, limits=ServeLimits(max_concurrency=3))
    body = _body(user_id="u1", n=2)
    _same(lane, ref, "POST", "/v1/recommend", [body])  # builds the middleware stacks
    counter = lane.fast_lanes["POST", "/v1/recommend"].in_flight
    assert _guard(lane).counter is counter  # the guard sees the lane's requests and vice versa
    counter.n = _guard(ref).counter.n = 3
    try:
        status, _, answer = _same(lane, ref, "POST", "/v1/recommend", [body])
        assert status == 503 and b"3 requests in flight" in answer
        assert _same(lane, ref, "GET", "/healthz")[0] == 200  # exempt
    finally:
        counter.n = _guard(ref).counter.n = 0
    assert _lane_counts(lane) == (1, 1)
    assert _metrics(lane) == _metrics(ref)


def test_bearer_tokens_are_checked_like_the_route_dependency(rec, tmp_path):
    keys = auth.parse_keys(
        [auth.key_line(s, f"k-{s}", sec) for s, sec in SECRETS.items()], str(tmp_path / "keys")
    )
    lane, ref = _apps(rec, api_keys=keys)
    body = _body(user_id="u1", n=2)
    length = (b"content-length", b"%d" % len(body))
    cases = {
        None: 401,
        b"": 401,
        b"Bearer": 401,
        b"Bearer ": 401,
        b"Basic " + SECRETS["read"].encode(): 401,
        b"Bearer wrong-secret": 401,
        b"Bearer " + SECRETS["read"].encode(): 200,
        b"bearer " + SECRETS["write"].encode(): 200,
        b"BEARER   " + SECRETS["admin"].encode() + b"  ": 200,
        b"Bearer " + SECRETS["read"].encode() + b"x": 401,
        b"Bearer\t" + SECRETS["read"].encode(): 401,
    }
    for value, expected in cases.items():
        headers = [length] if value is None else [length, (b"authorization", value)]
        status, got, _ = _same(lane, ref, "POST", "/v1/recommend", [body], headers=headers)
        assert status == expected, value
        if status == 401:
            assert any(k == b"www-authenticate" for k, _ in got)
    assert _lane_counts(lane) == (3, len(cases) - 3)
    # the first Authorization header counts (Starlette's Headers.get)
    two = [length, (b"authorization", b"Bearer nope"), (b"authorization", b"Bearer " + b"r")]
    assert _same(lane, ref, "POST", "/v1/score", [body], headers=two)[0] == 401
    assert _metrics(lane) == _metrics(ref)


def test_openapi_and_other_routes_are_unchanged(rec):
    lane, ref = _apps(rec)
    assert lane.openapi() == ref.openapi()
    for method, path in (("GET", "/healthz"), ("GET", "/v1/model"), ("GET", "/nope")):
        _same(lane, ref, method, path)
    assert any('route="/healthz"' in line for line in _metrics(lane))
    assert _metrics(lane) == _metrics(ref)
