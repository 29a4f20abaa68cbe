"""D8, disk full under the embedded Redis, on a real full file system (a 4 MiB tmpfs; needs root
and mount, skipped otherwise): the AOF write error surfaces as one line naming ENOSPC and the data
directory, readiness stays down instead of flapping, writes get 503 with that message, nothing
acknowledged is lost, and the service recovers once space is freed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.connection import connect, stop_embedded
from lrs_rec.serving.recommender import Recommender
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model, write_model_dir

from lrs_rec.model_dir import load_model_dir

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture
def small_fs(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield fs
    finally:
        stop_embedded(fs / "h", save=False)
        subprocess.run(["umount", "-l", str(fs)], check=False)


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_full_is_reported_not_flapping_and_recovers(small_fs, tmp_path, caplog):
    model_dir = tmp_path / "model"
    write_model_dir(
        random_trained_model(
            n_users=50, n_items=30, d=8, rank=4, sparsity=4, ratings_per_user=5, random_state=4
        ),
        model_dir,
    )
    home = small_fs / "h"
    RedisStore(connect(home=home)).publish(load_model_dir(model_dir), model_dir=str(model_dir))
    rec = Recommender(model_dir, home=home, version_refresh_interval=0)
    items = [f"i{k}" for k in range(20)]
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        acked = []
        _fill(small_fs / "filler")
        for k in range(200):  # the AOF's last page may still hold a few writes
            r = c.put(
                f"/v1/users/new{k}/ratings",
                json={"ratings": [{"item_id": i, "rating": 4.0} for i in items]},
            )
            if r.status_code != 200:
                break
            acked.append(f"new{k}")
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert "ENOSPC" in error and str(home.resolve()) in error, error
        assert "\n" not in error
        # readiness stays down (the server is not restarted into the next crash)
        for _ in range(10):
            r = c.get("/readyz")
            assert r.status_code == 503 and "ENOSPC" in r.json()["error"], r.text
            time.sleep(0.15)
        assert any(
            "ENOSPC" in rec.getMessage() and str(home.resolve()) in rec.getMessage()
            for rec in caplog.records
        )
        assert c.get("/healthz").status_code == 200
        (small_fs / "filler").unlink()
        deadline = time.monotonic() + 30
        while (r := c.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        # nothing acknowledged was lost
        for user in acked:
            r = c.post("/v1/score", json={"user_id": user, "item_ids": ["i1"]})
            assert r.status_code == 200 and r.json()["personalized"] is True, user
        r = c.put("/v1/users/after/ratings", json={"ratings": [{"item_id": "i1", "rating": 3}]})
        assert r.status_code == 200, r.text
