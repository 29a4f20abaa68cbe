"""Serving consequence of DP (issue 6): /v1/model never reveals what the ledger does not cover."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.connection import stop_embedded
from lrs_rec.serving.recommender import Recommender
from lrs_rec.training.private_accounting import EventGroup, calibrate_ledger, ledger_manifest
from lrs_rec.training.testing import random_trained_model, write_model_dir

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("private", [False, True])
def test_model_info_hides_user_count_of_private_models(tmp_path, monkeypatch, private) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("LRS_HOME", str(home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    model = random_trained_model(n_users=30, n_items=20, d=8, rank=2, sparsity=2)
    if private:
        ledger = calibrate_ledger(
            [EventGroup(name="U", count=2, share=1.0, releases=("U",))], epsilon=1.0, delta=1e-6
        )
        privacy = ledger_manifest(ledger, with_pld=False)
        model = dataclasses.replace(model, manifest={"privacy": privacy})
    write_model_dir(model, tmp_path / "m")
    args = ["publish", "--model", str(tmp_path / "m")]
    try:
        assert cli_main(args if not private else [*args, "--max-epsilon", "2"]) == 0
        with TestClient(create_app(Recommender(tmp_path / "m"))) as client:
            info = client.get("/v1/model").json()
        assert info["differentially_private"] is private
        assert info["n_users"] == (None if private else 30)
        assert info["n_items"] == 20
    finally:
        stop_embedded(home, save=False)
