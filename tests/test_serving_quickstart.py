"""`lrs-rec quickstart` end to end (small sample, temporary LRS_HOME): it must finish by itself."""

from __future__ import annotations

import pytest
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.connection import connect, stop_embedded
from lrs_rec.serving.store import RedisStore

pytestmark = pytest.mark.redis


def test_quickstart_runs_the_whole_path_and_exits(tmp_path, capsys):
    home = tmp_path / "home"
    try:
        assert cli_main(["quickstart", "--home", str(home), "--users", "150", "--items", "60"]) == 0
        out = capsys.readouterr().out
        assert "/v1/recommend" in out and "/v1/score" in out
        assert '"personalized": true' in out and '"personalized": false' in out
        # the unknown item gets the documented fallback score and is named (issue 12)
        assert '"unknown_item_ids": ["no-such-item"]' in out
        assert (home / "quickstart" / "model" / "model.onnx").is_file()
        store = RedisStore(connect(home=home / "quickstart"))
        assert store.current_version() == "v1"
    finally:
        stop_embedded(home / "quickstart", save=False)


def test_quickstart_leaves_the_users_own_store_alone(tmp_path, capsys):
    """Regression: quickstart published into HOME's store, switched `current` to the demo model
    and pruned the user's older versions."""
    from lrs_rec.training.testing import random_trained_model

    from lrs_rec.model_dir import save_model_dir

    home = tmp_path / "home"
    mine = save_model_dir(
        random_trained_model(n_users=20, n_items=10, d=6, rank=2, sparsity=1, random_state=0),
        tmp_path / "mine",
    )
    try:
        store = RedisStore(connect(home=home))
        for _ in range(3):
            store.publish(mine)
        before = ([m.version for m in store.list_versions()], store.current_version())
        store.handle.close()
        for _ in range(2):
            assert (
                cli_main(["quickstart", "--home", str(home), "--users", "150", "--items", "60"])
                == 0
            )
        capsys.readouterr()
        store = RedisStore(connect(home=home))
        after = ([m.version for m in store.list_versions()], store.current_version())
        assert after == before == (["v1", "v2", "v3"], "v3")
    finally:
        stop_embedded(home / "quickstart", save=False)
        stop_embedded(home, save=False)


def test_quickstart_stops_its_embedded_redis_when_it_exits(tmp_path):
    # regression: the service's asyncio Redis client (serving.async_front) was never closed, so at
    # exit the process saw a client still connected and left the server to the 30 s watchdog
    import os
    import subprocess
    import sys

    from lrs_rec.serving.connection import _server_gone, embedded_socket

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "LRS_REDIS_URL"}
    env["LRS_REDIS_IDLE_EXIT"] = "600"  # the watchdog must not be what stops it
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lrs_rec.serving.cli", "quickstart", "--home", str(home),
             "--users", "150", "--items", "60"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert _server_gone(embedded_socket(home / "quickstart"))
    finally:
        stop_embedded(home / "quickstart", save=False)
