"""The HTTP service (FastAPI): ``create_app(recommender)``.

Routes (a contract — outside checks call them)::

    POST /v1/score      {"user_id", "item_ids"}            -> {"user_id", "scores", "personalized", "model_version",
                                                               "unknown_item_ids"}
    POST /v1/recommend  {"user_id", "n", "exclude_rated"}  -> {"user_id", "items": [{"item_id", "score"}],
                                                               "personalized", "model_version"}
    PUT  /v1/users/{user_id}/ratings   onboarding       GET  /v1/users/{user_id}/ratings  stored history
    DELETE /v1/users/{user_id}         erasure (serving.erasure)
    GET  /v1/model   version, dims, counts        GET /healthz   process is up
    GET  /readyz     503 unless Redis answers and a servable version is published
    GET  /metrics    Prometheus text format

Client mistakes (malformed JSON, duplicate keys, wrong types, unknown items, n out of range,
oversized body) are 4xx with a message; Redis trouble is a fast 503 with ``Retry-After``; nothing else
is expected to 5xx. score and recommend read Redis
asynchronously on the event loop (``serving.async_front``), onboarding, readiness and version checks
run in a bounded pool of worker threads (``serving.offload``); every Redis call has a timeout, so a
slow or paused Redis never blocks the loop: ``/healthz`` and ``/metrics`` answer at once, and
requests fail with 503 within their timeout.
Connection, timeout and concurrency limits: ``serving.guards``; the OpenAPI document:
``serving.openapi``.
score and recommend of plain requests are answered by the lean lanes of ``serving.fast_lane`` in
front of FastAPI (same checks, same bytes); anything else, and ``create_app(fast_lane=False)``,
goes through the routes below.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as StarletteJSONResponse
from fastapi.responses import PlainTextResponse, Response
from lrs_rec.serving import auth, openapi
from lrs_rec.serving.async_front import AsyncFront
from lrs_rec.serving.docs import add_offline_docs
from lrs_rec.serving.encoding import RecordError
from lrs_rec.serving.erasure import UnknownUserError, erase_user, user_ratings
from lrs_rec.serving.fast_lane import Answer, FastLane, bearer_check
from lrs_rec.serving.fast_request import parse_recommend, parse_score
from lrs_rec.serving.guards import InFlight, RequestGuardMiddleware, ServeLimits
from lrs_rec.serving.metrics import (
    ASGIApp,
    Message,
    Metrics,
    MetricsMiddleware,
    Receive,
    Scope,
    Send,
)
from lrs_rec.serving.offload import Offload
from lrs_rec.serving.onboarding import OnboardingInputError, validate_user_id
from lrs_rec.serving.recommender import (
    NotReadyError,
    Recommender,
    StoreUnavailableError,
    UnknownItemsError,
)
from lrs_rec.serving.render import recommend_json
from lrs_rec.serving.strict_json import duplicate_key
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from lrs_rec.ids import MAX_ID_LENGTH

try:  # orjson encodes a 100-item answer ~20x faster than the stdlib (~10 µs vs ~200 µs)
    import orjson

    def _dumps(content: Any) -> bytes:
        return orjson.dumps(content)

except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
    import json

    def _dumps(content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()


class JSONResponse(StarletteJSONResponse):
    """``application/json`` rendered with orjson."""

    def render(self, content: Any) -> bytes:
        return _dumps(content)


log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 256 * 1024
ROUTES = {"/v1/score", "/v1/recommend", "/v1/model", "/healthz", "/readyz", "/metrics"}
ROUTES.add("/v1/users/{user_id}/ratings")  # onboarding (serving.onboarding)
ROUTES.add("/v1/users/{user_id}")  # erasure (serving.erasure)


class _UserIdConvertor(Convertor[str]):
    """A user id in a path: any non-empty text, "/" (sent as %2F, decoded before routing) and
    control characters included — those reach validation and get a 422 there, not a 404."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("lrs_user_id", _UserIdConvertor())


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_ids: list[Annotated[StrictStr, Field(max_length=MAX_ID_LENGTH)]]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    n: StrictInt = 10
    exclude_rated: StrictBool = True


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    # StrictFloat takes JSON integers too (one type: errors read "Input should be a valid number",
    # not a message per union branch); an integer beyond float range parses as inf and is refused
    rating: StrictFloat
    timestamp: StrictFloat | None = None


class OnboardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratings: list[RatingIn]


class _App(FastAPI):
    """FastAPI with the fast lanes of ``serving.fast_lane`` in front: a request of exactly a lane's
    method and path goes to the lane, everything else (and every lane's fallback) to FastAPI."""

    fast_lanes: dict[tuple[str, str], FastLane]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.fast_lanes:
            lane = self.fast_lanes.get((scope["method"], scope["path"]))
            if lane is not None:
                if self.middleware_stack is None:  # as Starlette would on a first request
                    self.middleware_stack = self.build_middleware_stack()
                await lane(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def reference(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The whole FastAPI application, without the lanes (their fallback)."""
        await super().__call__(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``limit`` bytes, by Content-Length or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
        # read the (small) body up front so an oversized one is refused before any parsing
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                await self._reject(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = b'{"error":"request body too large (limit %d bytes)"}' % self.limit
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _bad_user_id(user_id: str) -> JSONResponse | None:
    """A 422 for an id no user can have (the onboarding rule: control characters, U+FFFD), so
    that score/recommend do not answer such ids with the population model."""
    try:
        validate_user_id(user_id)
    except OnboardingInputError as e:
        return _error(422, str(e))
    return None


def _error(code: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if code == 503 else None
    return JSONResponse({"error": message, **extra}, status_code=code, headers=headers)


def _known_error(exc: Exception) -> JSONResponse | None:
    """The answer of the app's exception handlers for the errors score/recommend raise on
    purpose (the fast lane answers them itself, the same way); None for anything else."""
    if isinstance(exc, UnknownItemsError):
        return _error(422, str(exc), unknown_item_ids=exc.item_ids[:100])
    if isinstance(exc, (StoreUnavailableError, NotReadyError)):
        return _error(503, str(exc))
    return None


def _answer(response: Response) -> Answer:
    """A response as the fast lane sends it: the same status, headers and body bytes."""
    return response.status_code, response.raw_headers, bytes(response.body)


def _known_answer(exc: Exception) -> Answer | None:
    """The fast lane's answer to an error score/recommend raise on purpose; None (the reference
    route answers, and logs) for anything else."""
    known = _known_error(exc)
    return None if known is None else _answer(known)


def _score_answer(res: Any) -> dict[str, Any]:
    return {
        "user_id": res.user_id,
        "scores": res.scores,
        "personalized": res.personalized,
        "model_version": res.model_version,
        "unknown_item_ids": res.unknown_item_ids,
    }


def _invalid(errors: Sequence[Any]) -> JSONResponse:
    """422 naming the offending fields, for FastAPI's and our own pydantic validation errors."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    return _error(422, "invalid request: " + "; ".join(parts), detail=detail)


ModelT = TypeVar("ModelT", bound=BaseModel)


def _parse(model: type[ModelT], body: bytes) -> ModelT | JSONResponse:
    try:
        parsed = model.model_validate_json(body or b"null")
    except ValidationError as e:
        return _invalid(e.errors(include_url=False))
    if (dup := duplicate_key(body)) is not None:  # valid JSON, but which value did the client mean?
        return _error(422, f"invalid request: duplicate key {dup!r} in a JSON object")
    return parsed


_JSON_TYPE = (b"content-type", b"application/json")
_body_schema = openapi.body_schema
_ERRORS = openapi.errors(400, 408, 413, 422, 503)
_USER_ERRORS = openapi.errors(400, 404, 422, 503)  # the stored-ratings and erasure routes


def create_app(
    recommender: Recommender,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_keys: auth.KeyRing | None = None,
    limits: ServeLimits | None = None,
    fast_lane: bool = True,
) -> FastAPI:
    """The service. ``fast_lane=False``: score and recommend only through their FastAPI routes
    (the reference the fast lanes of ``serving.fast_lane`` are compared with in the tests)."""
    # redirect_slashes=False: "/v1/score/" is an unknown route (404 with {"error"}), not a 307 with
    # an empty body that a client following redirects would replay as a second POST
    app = _App(title="lrs-rec", version="1", docs_url=None, redoc_url=None, redirect_slashes=False)
    app.fast_lanes = {}
    add_offline_docs(app)  # /docs with Swagger UI served locally (no CDN: serving.docs)
    metrics = Metrics()
    limits = limits or ServeLimits()
    # Redis / ONNX / onboarding work: worker threads, a request waits for one at most as long as
    # a Redis call may take
    offload = Offload(limits.threads, queue_timeout=recommender.handle.socket_timeout)
    app.state.offload = offload
    # score / recommend: Redis read on the loop; recommend's rows cached (serving.user_cache)
    front = AsyncFront(recommender, offload, cache=limits.user_cache)
    app.state.front = front
    if front.cache is not None:
        metrics.watch_user_cache(front.cache)
    inner_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def _lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner_lifespan(a) as state:
            try:
                yield state
            finally:
                await front.aclose()  # its connections would outlive the process's exit hook

    app.router.lifespan_context = _lifespan
    app.state.recommender = recommender
    app.state.metrics = metrics
    rec = recommender
    counters: dict[tuple[str, bool], Any] = {}

    def _personalized(route: str, flag: bool) -> Any:
        """The (route, personalized) child of the counter, looked up once (created on first use,
        so /metrics lists only the label pairs that occurred)."""
        child = counters.get((route, flag))
        if child is None:
            child = counters[route, flag] = metrics.personalized.labels(route, str(flag).lower())
        return child

    # route dependencies of the API keys (serving.auth): none at all without --api-keys
    read, write = auth.guard(api_keys, "read"), auth.guard(api_keys, "write")

    def _with_auth(errors: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
        # with --api-keys a route may also answer 401 / 403: documented only then
        return errors if api_keys is None else {**errors, **openapi.errors(401, 403)}

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes (404) and methods (405) answer in the same {"error": ...} shape
        response = _error(exc.status_code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:  # every method of every route of this path, not the first's
            response.headers["allow"] = _allowed(app, request.url.path)
        return response

    # no route declares a body FastAPI validates (they parse it themselves, below): this keeps any
    # future declared parameter's error in the same 422 shape
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(UnknownItemsError)
    @app.exception_handler(StoreUnavailableError)
    @app.exception_handler(NotReadyError)
    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return _known_error(exc) or _error(500, f"internal error ({type(exc).__name__})")

    @app.exception_handler(RecordError)
    async def _corrupt(_: Request, exc: RecordError) -> JSONResponse:
        log.error("corrupt record in Redis: %s", exc)
        return _error(500, f"stored record is corrupt: {exc}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__})")

    @app.exception_handler(UnknownUserError)
    async def _unknown_user(_: Request, exc: UnknownUserError) -> JSONResponse:
        return _error(404, str(exc))

    # The routes with a body parse and validate it in one pydantic-core call
    # (``model_validate_json``) instead of FastAPI's body/dependency machinery (~2x less overhead);
    # the request schemas stay in the OpenAPI document through ``openapi_extra``.
    @app.post(
        "/v1/score",
        openapi_extra=_body_schema(ScoreRequest),
        dependencies=read,
        responses=_with_auth(_ERRORS),
    )
    async def score(request: Request) -> Response:
        req = _parse(ScoreRequest, await request.body())
        if isinstance(req, Response):
            return req
        if len(req.item_ids) > rec.max_items:
            return _error(422, f"item_ids: at most {rec.max_items} ids, got {len(req.item_ids)}")
        if (bad := _bad_user_id(req.user_id)) is not None:
            return bad
        res = await front.score(req.user_id, req.item_ids)
        _personalized("/v1/score", res.personalized).inc()
        return JSONResponse(_score_answer(res))

    @app.post(
        "/v1/recommend",
        openapi_extra=_body_schema(RecommendRequest),
        dependencies=read,
        responses=_with_auth(_ERRORS),
    )
    async def recommend(request: Request) -> Response:
        body = await request.body()
        # plainly valid bodies without pydantic (serving.fast_request); else its reference twin
        fields = parse_recommend(body)
        if fields is None:
            req = _parse(RecommendRequest, body)
            if isinstance(req, Response):
                return req
            fields = (req.user_id, req.n, req.exclude_rated)
        user_id, n, exclude_rated = fields
        if not 1 <= n <= rec.max_n:
            return _error(422, f"n: must be an integer in [1, {rec.max_n}], got {n}")
        if (bad := _bad_user_id(user_id)) is not None:
            return bad
        top = await front.recommend_top(user_id, n, exclude_rated)
        _personalized("/v1/recommend", top.personalized).inc()
        # written from the item indices and scores (serving.render; == orjson of the dict, tested)
        return Response(recommend_json(top), media_type="application/json")

    @app.put(
        "/v1/users/{user_id:lrs_user_id}/ratings",
        openapi_extra=_body_schema(OnboardRequest),
        dependencies=write,
        responses=_with_auth(_ERRORS),
    )
    async def onboard(user_id: str, request: Request) -> Response:
        # the body is parsed like the other routes (any Content-Type, errors as {"error": ...});
        # the fit and the fsync'ed Redis write run in the thread pool so they do not block the
        # event loop serving score/recommend
        req = _parse(OnboardRequest, await request.body())
        if isinstance(req, Response):
            return req
        ratings = [(x.item_id, x.rating, x.timestamp) for x in req.ratings]
        try:
            res = await offload(rec.onboard, user_id, ratings)
        except OnboardingInputError as e:
            return _error(422, str(e))
        finally:  # Redis invalidates it too (CLIENT TRACKING); this is at once
            front.forget_user(user_id)
        return JSONResponse(
            {
                "user_id": res.user_id,
                "n_ratings": res.n_ratings,
                "personalized": res.personalized,
                "model_version": res.model_version,
                "ignored_item_ids": res.ignored_item_ids,
            }
        )

    @app.get(
        "/v1/users/{user_id:lrs_user_id}/ratings",
        dependencies=write,
        responses=_with_auth(_USER_ERRORS),
    )
    async def stored_ratings(user_id: str) -> Response:
        try:
            res = await offload(user_ratings, rec, user_id)
        except OnboardingInputError as e:
            return _error(422, str(e))
        return JSONResponse(
            {
                "user_id": res.user_id,
                "ratings": [{"item_id": i, "rating": r} for i, r in res.ratings],
                "n_ratings": len(res.ratings),
                "updated_at": res.updated_at,
                "store_version": res.store_version,
                "model_version": res.model_version,
            }
        )

    @app.delete(
        "/v1/users/{user_id:lrs_user_id}", dependencies=write, responses=_with_auth(_USER_ERRORS)
    )
    async def erase(user_id: str) -> Response:
        try:
            res = await offload(erase_user, rec, user_id)
        except OnboardingInputError as e:
            return _error(422, str(e))
        finally:
            front.forget_user(user_id)
        return JSONResponse(
            {
                "user_id": res.user_id,
                "erased": True,
                "erased_at": res.erased_at,
                "store_versions": res.store_versions,
                "unscrubbed_versions": res.unscrubbed_versions,
            }
        )

    @app.get("/v1/model", dependencies=read, responses=_with_auth({}))
    async def model_info() -> Response:
        def refresh() -> None:
            try:
                rec.refresh()
            except (StoreUnavailableError, NotReadyError):
                pass  # still describe the loaded model

        try:
            await offload(refresh)
        except StoreUnavailableError:
            pass  # every worker busy: describe what is loaded
        return JSONResponse(rec.info())

    # HEAD answers like GET; out of the OpenAPI schema, where it would repeat GET's operation id
    @app.get("/healthz")
    @app.head("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", responses=openapi.errors(503))
    @app.head("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            ok, reason = await offload(rec.ready)
        except StoreUnavailableError as e:  # every worker busy
            ok, reason = False, str(e)
        metrics.ready.set(1 if ok else 0)
        if not ok:
            return _error(503, reason, status="unavailable")
        return JSONResponse(
            {
                "status": "ready",
                "store_version": rec.store_version,
                "model_version": rec.model_version,
            }
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # the fast lanes (serving.fast_lane): score and recommend without the framework's layers,
    # answering only what the routes above would answer the same; anything else goes to them
    async def fast_score(body: bytes) -> Answer | None:
        fields = parse_score(body)
        if fields is None:
            return None
        user_id, item_ids = fields
        if len(item_ids) > rec.max_items or _bad_user_id(user_id) is not None:
            return None
        try:
            res = await front.score(user_id, item_ids)
        except (UnknownItemsError, StoreUnavailableError, NotReadyError) as e:
            return _known_answer(e)
        answer = _answer(JSONResponse(_score_answer(res)))
        _personalized("/v1/score", res.personalized).inc()
        return answer

    async def fast_recommend(body: bytes) -> Answer | None:
        fields = parse_recommend(body)
        if fields is None:
            return None
        user_id, n, exclude_rated = fields
        if not 1 <= n <= rec.max_n or _bad_user_id(user_id) is not None:
            return None
        try:
            top = await front.recommend_top(user_id, n, exclude_rated)
        except (StoreUnavailableError, NotReadyError) as e:
            return _known_answer(e)
        data = recommend_json(top)
        _personalized("/v1/recommend", top.personalized).inc()
        return 200, [(b"content-length", b"%d" % len(data)), _JSON_TYPE], data

    in_flight = InFlight()
    if fast_lane:
        authorize = None if api_keys is None else bearer_check(api_keys, "read")
        for path, handler in (("/v1/score", fast_score), ("/v1/recommend", fast_recommend)):
            app.fast_lanes["POST", path] = FastLane(
                app.reference,
                handler,
                method="POST",
                route=path,
                metrics=metrics,
                in_flight=in_flight,
                max_concurrency=limits.max_concurrency,
                body_timeout=limits.body_timeout,
                max_body_bytes=max_body_bytes,
                authorize=authorize,
            )

    # the last added is the outermost: metrics also see the 413s of the body limit
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(
        RequestGuardMiddleware,
        body_timeout=limits.body_timeout,
        max_concurrency=limits.max_concurrency,
        counter=in_flight,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=ROUTES)
    openapi.install(app)
    return app


def _allowed(app: FastAPI, path: str) -> str:
    """The ``Allow`` header of a 405: the methods of every route matching ``path``."""
    from starlette.routing import Match

    methods: set[str] = set()
    scope = {"type": "http", "path": path, "method": ""}
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    order = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    return ", ".join(sorted(methods, key=lambda m: (order.index(m) if m in order else 99, m)))
