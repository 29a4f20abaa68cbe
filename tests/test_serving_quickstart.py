"""`lrs-rec quickstart` end to end (small sample, temporary LRS_HOME): it must finish by itself."""

from __future__ import annotations

import pytest

from serving.cli import main as cli_main
from serving.connection import connect, stop_embedded
from serving.store import RedisStore

pytestmark = pytest.mark.redis


def test_quickstart_runs_the_whole_path_and_exits(tmp_path, capsys):
    home = tmp_path / "home"
    try:
        assert cli_main(["quickstart", "--home", str(home), "--users", "150", "--items", "60"]) == 0
        out = capsys.readouterr().out
        assert "/v1/recommend" in out and "/v1/score" in out
        assert '"personalized": true' in out and '"personalized": false' in out
        assert "422" in out  # the unknown item is shown as a client error
        assert (home / "quickstart" / "model" / "model.onnx").is_file()
        store = RedisStore(connect(home=home))
        assert store.current_version() == "v1"
    finally:
        stop_embedded(home, save=False)
