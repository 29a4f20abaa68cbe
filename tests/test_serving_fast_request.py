"""``serving.fast_request.parse_recommend`` (orjson + explicit checks) against its slow twin, the
pydantic ``RecommendRequest`` + duplicate-key path of the route: whenever the fast parser answers,
the slow one accepts the body with the same fields; when the slow one refuses, the fast one must
not answer (so every 422 message is the slow path's). Pure unit tests, no Redis."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.responses import Response
from lrs_rec.serving.app import RecommendRequest, ScoreRequest, _parse
from lrs_rec.serving.fast_request import parse_recommend, parse_score

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
        body = _mutated(("{" + ",".join(parts) + "}").encode(), rng)
        answered += _agree(parse_recommend(body), _slow(body), body)
    assert answered > 100  # the comparison covered accepted bodies too


def _mutated(body: bytes, rng: random.Random) -> bytes:
    """``body``, one time in ten truncated and one in ten with a random byte."""
    r = rng.random()
    if r < 0.1 and body:
        return body[: rng.randrange(len(body))]
    if r < 0.2 and body:
        i = rng.randrange(len(body))
        return body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :]
    return body


def _agree(fast: object, slow: object, body: bytes) -> bool:
    """The fast parser answers only bodies the slow one accepts, with the same fields; True if
    it answered."""
    if fast is not None:
        assert fast == slow, body
    if slow is None:
        assert fast is None, body
    return fast is not None


def _slow_score(body: bytes) -> tuple[str, list[str]] | None:
    req = _parse(ScoreRequest, body)
    if isinstance(req, Response):
        return None
    return req.user_id, req.item_ids


SCORE_TRICKY = [
    b'{"user_id": "196", "item_ids": ["1", "2", "3"]}',
    b'{"item_ids": [], "user_id": "u"}',
    b'{"user_id": "u", "item_ids": [""]}',
    b'{"user_id": "u", "item_ids": ["' + b"i" * MAX_ID_LENGTH + b'"]}',
    b'{"user_id": "u", "item_ids": ["' + b"i" * (MAX_ID_LENGTH + 1) + b'"]}',
    '{"user_id": "u", "item_ids": ["' + "é" * MAX_ID_LENGTH + '"]}',
    '{"user_id": "u", "item_ids": ["' + "é" * (MAX_ID_LENGTH + 1) + '"]}',
    '{"user_id": "ユーザー", "item_ids": ["映画"]}',
    b'{"user_id": "u"}',
    b'{"item_ids": ["1"]}',
    b'{"user_id": "", "item_ids": ["1"]}',
    b'{"user_id": 1, "item_ids": ["1"]}',
    b'{"user_id": "u", "item_ids": [1]}',
    b'{"user_id": "u", "item_ids": ["1", null]}',
    b'{"user_id": "u", "item_ids": "1"}',
    b'{"user_id": "u", "item_ids": null}',
    b'{"user_id": "u", "item_ids": {"1": 1}}',
    b'{"user_id": "u", "item_ids": [["1"]]}',
    b'{"user_id": "u", "item_ids": ["1"], "n": 3}',
    b'{"user_id": "u", "item_ids": ["1"], "user_id": "v"}',
    b'{"user_id": "u", "item_ids": ["1"], "item_ids": ["2"]}',
    b'{"user_id": "u", "item_ids": ["user_id"]}',
    b'{"user_id": "u", "item_ids": ["\\"user_id\\""]}',
    b'{"user_id": "u", "item_ids": ["a\\u0041"]}',
    b'{"user\\u005fid": "u", "item_ids": []}',
    b'{"user_id": "u", "item_ids": ["1",]}',
    b'{"user_id": "u", "item_ids": ["1"]} []',
    b'{"user_id": "u", "item_ids": ["\xff"]}',
    b"[]",
    b"null",
    b"",
    b'\xef\xbb\xbf{"user_id": "u", "item_ids": []}',
]


@pytest.mark.parametrize("body", SCORE_TRICKY)
def test_fast_score_parse_agrees_with_pydantic(body):
    body = body if isinstance(body, bytes) else body.encode()
    fast, slow = parse_score(body), _slow_score(body)
    if fast is not None:
        assert fast == slow
    if slow is None:
        assert fast is None


def test_fast_score_parse_answers_the_common_bodies():
    for body in (
        {"user_id": "196", "item_ids": ["242", "302", "377"]},
        {"user_id": "u 42", "item_ids": []},
        {"item_ids": [str(i) for i in range(500)], "user_id": "7"},
    ):
        raw = json.dumps(body).encode()
        assert parse_score(raw) == _slow_score(raw) is not None


def test_fast_score_parse_agrees_on_random_mutations():
    """Seeded random score bodies (keys repeated or odd, item lists of mixed types, truncations
    and byte flips): the fast parser answers only what pydantic accepts, with the same fields."""
    rng = random.Random(1)
    keys = ["user_id", "item_ids", "x", "items"]
    items = ['"1"', '"i 2"', '""', '"user_id"', "3", "null", "true", '["1"]', '"a\\u0041"']
    answered = 0
    for _ in range(3000):
        if rng.random() < 0.6:
            pairs = [("user_id", rng.choice(['"u"', '"item_ids"', '""', "7"]))]
            listed = ",".join(rng.choice(items[:3] if rng.random() < 0.7 else items)
                              for _ in range(rng.randint(0, 5)))  # fmt: skip
            pairs.append(("item_ids", "[" + listed + "]"))
            pairs += [(rng.choice(keys), '"v"')] * (rng.random() < 0.15)
            rng.shuffle(pairs)
        else:
            pairs = [(rng.choice(keys), rng.choice(items)) for _ in range(rng.randint(0, 3))]
        body = _mutated(("{" + ", ".join(f'"{k}": {v}' for k, v in pairs) + "}").encode(), rng)
        answered += _agree(parse_score(body), _slow_score(body), body)
    assert answered > 100
