"""``serving.fast_request.parse_recommend`` (orjson + explicit checks) against its slow twin, the
pydantic ``RecommendRequest`` + duplicate-key path of the route: whenever the fast parser answers,
the slow one accepts the body with the same fields; when the slow one refuses, the fast one must
not answer (so every 422 message is the slow path's). Pure unit tests, no Redis."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.responses import Response
from lrs_rec.serving.app import RecommendRequest, _parse
from lrs_rec.serving.fast_request import parse_recommend

from lrs_rec.ids import MAX_ID_LENGTH


def _slow(body: bytes) -> tuple[str, int, bool] | None:
    req = _parse(RecommendRequest, body)
    if isinstance(req, Response):
        return None
    return req.user_id, req.n, req.exclude_rated


TRICKY = [
    b'{"user_id": "196", "n": 10, "exclude_rated": true}',
    b'{"user_id": "196"}',
    b'{"n": 5, "user_id": "u"}',
    b'{"user_id": "a", "exclude_rated": false}',
    b' \n{"user_id":"x","n":0}\t',  # n out of range is the route's check, not the parser's
    b'{"user_id": "x", "n": -3}',
    b'{"user_id": "' + b"u" * MAX_ID_LENGTH + b'"}',
    b'{"user_id": "' + b"u" * (MAX_ID_LENGTH + 1) + b'"}',
    '{"user_id": "' + "é" * MAX_ID_LENGTH + '"}',  # characters, not bytes
    '{"user_id": "' + "é" * (MAX_ID_LENGTH + 1) + '"}',
    '{"user_id": "ユーザー", "n": 3}',
    b'{"user_id": ""}',
    b'{"user_id": 196}',
    b'{"user_id": null}',
    b'{"user_id": ["196"]}',
    b'{"user_id": "196", "n": 10.0}',
    b'{"user_id": "196", "n": 1e1}',
    b'{"user_id": "196", "n": "10"}',
    b'{"user_id": "196", "n": true}',
    b'{"user_id": "196", "n": null}',
    b'{"user_id": "196", "n": 99999999999999999999999}',
    b'{"user_id": "196", "n": -0}',
    b'{"user_id": "196", "exclude_rated": 1}',
    b'{"user_id": "196", "exclude_rated": "true"}',
    b'{"user_id": "196", "exclude_rated": null}',
    b'{"user_id": "196", "extra": 1}',
    b'{"user_id": "196", "N": 1}',
    b'{"n": 5}',
    b"{}",
    b"[]",
    b'["user_id"]',
    b'"user_id"',
    b"null",
    b"",
    b"   ",
    b"{",
    b'{"user_id": "196",}',
    b'{"user_id": "196"} {}',
    b'{"user_id": "196"}x',
    b"\xff\xfe",
    b'{"user_id": "\xff"}',
    b'{"user_id": "a", "user_id": "b"}',
    b'{"user_id": "a", "n": 1, "n": 2}',
    b'{"user_id": "a", "exclude_rated": true, "exclude_rated": false}',
    b'{"user_id": "a", "user\\u005fid": "b"}',  # the same key, escaped
    b'{"user\\u005fid": "b"}',
    b'{"user_id": "a\\"b"}',
    b'{"user_id": "a\\nb"}',
    b'{"user_id": "a\\u0000b"}',
    b'{"user_id": "n"}',  # a value that spells a key: the slow path decides
    b'{"user_id": "\\"n\\""}',
    b'{"user_id": "x\\"n\\"", "n": 3}',
    b'{"user_id": "a", "n": NaN}',
    b'{"user_id": "a", "n": Infinity}',
    b'{"user_id": "a" , "n" : 7 , "exclude_rated" : false }',
    b'\xef\xbb\xbf{"user_id": "a"}',  # a byte-order mark
]


@pytest.mark.parametrize("body", TRICKY)
def test_fast_parse_agrees_with_pydantic(body):
    body = body if isinstance(body, bytes) else body.encode()
    fast, slow = parse_recommend(body), _slow(body)
    if fast is not None:
        assert fast == slow
        assert type(fast[1]) is int and type(fast[2]) is bool
    if slow is None:
        assert fast is None


def test_fast_parse_answers_the_common_bodies():
    """The bench's and the README's bodies take the fast path (else it would be pointless)."""
    for body in (
        {"user_id": "196", "n": 100, "exclude_rated": True},
        {"user_id": "196"},
        {"user_id": "u 42", "n": 1, "exclude_rated": False},
    ):
        raw = json.dumps(body).encode()
        assert parse_recommend(raw) == _slow(raw) is not None


def test_fast_parse_agrees_on_random_mutations():
    """Seeded random bodies: keys from a small alphabet (some repeated), values of every JSON
    type, random whitespace and escapes, and byte-level truncations and flips."""
    rng = random.Random(0)
    keys = ["user_id", "n", "exclude_rated", "x", "user_id ", "N"]
    values = [
        '"u"',
        '"n"',
        '""',
        '"a\\u0041"',
        "3",
        "0",
        "-1",
        "2.0",
        "1e2",
        "true",
        "false",
        "null",
        "[]",
        "{}",
        '"user_id"',
        "12345678901234567890123",
    ]
    answered = 0
    for _ in range(3000):
        if rng.random() < 0.5:  # mostly well-formed: each key once, maybe an odd one in
            pairs = [("user_id", rng.choice(['"u"', '"n"', '"user 7"', "7"]))]
            pairs += [("n", rng.choice(["3", "100", "1.0"]))] * rng.randint(0, 1)
            pairs += [("exclude_rated", rng.choice(["true", "false", "0"]))] * rng.randint(0, 1)
            pairs += [(rng.choice(keys), rng.choice(values))] * (rng.random() < 0.2)
            rng.shuffle(pairs)
        else:
            pairs = [(rng.choice(keys), rng.choice(values)) for _ in range(rng.randint(0, 4))]
        ws = ["", " "]
        parts = [
            f'{rng.choice(ws)}"{key}"{rng.choice(ws)}:{rng.choice(ws)}{value}'
            for key, value in pairs
        ]
        body = ("{" + ",".join(parts) + "}").encode()
        r = rng.random()
        if r < 0.1 and body:
            body = body[: rng.randrange(len(body))]
        elif r < 0.2 and body:
            i = rng.randrange(len(body))
            body = body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :]
        fast, slow = parse_recommend(body), _slow(body)
        if fast is not None:
            answered += 1
            assert fast == slow, body
        if slow is None:
            assert fast is None, body
    assert answered > 100  # the comparison covered accepted bodies too
