"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """Path of MovieLens 100K (never copied into the project); skips when absent."""
    if not (ML100K / "u1.base").is_file():
        pytest.skip(
            f"MovieLens 100K not found at {ML100K} (tests marked ml100k need ../shared/data)"
        )
    return ML100K


@pytest.fixture
def home(tmp_path: Path):
    """LRS_HOME of an embedded redis-server for one test; the server is stopped afterwards."""
    from lrs_rec.serving.connection import stop_embedded

    h = tmp_path / "h"
    yield h
    stop_embedded(h, save=False)


@pytest.fixture
def no_revive(monkeypatch):
    """Keep a stopped embedded server down: a Recommender would otherwise start it again on the
    first failed request (RedisHandle.revive_embedded), and the outage could not be observed."""
    from lrs_rec.serving.connection import RedisHandle

    monkeypatch.setattr(RedisHandle, "revive_embedded", lambda self: False)


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    """The suite runs with one BLAS thread, as the `lrs-rec` CLI does (serving.cli.blas_threads):
    the many small batched solves are slower with OpenBLAS threads, much slower on a busy machine."""
    from lrs_rec.serving.cli import blas_threads

    with blas_threads():
        yield


@pytest.fixture(autouse=True)
def engine_backend_restored():
    """`lrs-rec train` selects the engine's compiled kernels and thread count for its process;
    in the test process each test starts from (and gets back) the library default: the numpy
    reference kernels, one thread."""
    from lrs_rec.engine import parallel

    yield
    parallel.configure(n_threads=1, kernels=None)
