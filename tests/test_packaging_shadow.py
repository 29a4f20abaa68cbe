"""A user project's own ``training/`` and ``serving/`` packages cannot shadow lrs-rec: with such
look-alikes first on the path (PYTHONPATH and the working directory), lrs-rec still trains (CLI),
loads (``lrs_rec.load_model``) and serves (the HTTP app over an embedded Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LOOK_ALIKES = {
    "training": 'raise ImportError("the user project\'s own training package")\n',
    "serving": "Recommender = None\ncreate_app = None\nmain = None\nJUNK = 'user serving'\n",
}

SERVE = textwrap.dedent(
    """
    import sys

    # the look-alikes really are first on the path
    try:
        import training  # noqa: F401
    except ImportError as e:
        assert "user project" in str(e), e
    else:
        raise AssertionError("the look-alike training package was not found first")
    import serving
    assert serving.JUNK == "user serving", serving.__file__

    import numpy as np
    from fastapi.testclient import TestClient

    import lrs_rec
    from lrs_rec.serving.app import create_app
    from lrs_rec.serving.cli import main
    from lrs_rec.serving.connection import stop_embedded
    from lrs_rec.serving.recommender import Recommender

    model = lrs_rec.load_model("m")
    pred = model.predict(["u1", "u2", "nobody"], ["i1", "i2", "i3"])
    assert pred.shape == (3,) and np.all(np.isfinite(pred)), pred
    assert main(["publish", "--model", "m"]) == 0
    rec = Recommender("m")
    try:
        with TestClient(create_app(rec)) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            r = client.post("/v1/recommend", json={"user_id": "u1", "n": 3})
            assert r.status_code == 200, r.text
            served = [it["item_id"] for it in r.json()["items"]]
            assert served == [i for i, _ in model.recommend("u1", n=3)], served
    finally:
        rec.close()
        stop_embedded(save=False)
    print("served", served)
    """
)


@pytest.mark.redis
@pytest.mark.slow
def test_look_alike_training_and_serving_packages_do_not_shadow_lrs_rec(tmp_path: Path) -> None:
    from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings

    for name, body in LOOK_ALIKES.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    write_sample_ratings(tmp_path / "ratings.csv", make_sample_ratings(60, 40, random_state=0))
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "LRS_HOME": str(tmp_path / "home"),
        "OPENBLAS_NUM_THREADS": "1",
    }
    env.pop("LRS_REDIS_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    train = ["train", "--ratings", "ratings.csv", "--out", "m", "--quiet"]
    small = ["--dim", "4", "--rank", "2", "--sparsity", "1", "--n-iter", "2"]
    run("-m", "lrs_rec.serving.cli", *train, *small)
    assert (tmp_path / "m" / "model.onnx").is_file()
    out = run("-c", SERVE).stdout
    assert "served" in out
