"""Every ```python block of README.md runs as written, in order, in a scratch working directory
holding generated sample data in the files the snippets name (``ml-100k/u1.base`` etc. are
synthetic ML-100K-format files, never the real data), with ``LRS_HOME`` pointing into it.

Each block is a test of its own; a block runs after the blocks before it (it may use the model
they wrote). A block that imports a peer library (Surprise) is skipped, with a message, when that
library is not installed; the lrs-rec blocks never depend on it."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PEERS = {"surprise": "scikit-surprise"}  # module -> pip name of libraries README compares with


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of README.md."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = readme_blocks()
# the ids the README snippets use: users 196 and 186, items 242, 302, 50, 181
NEEDED_USERS, NEEDED_ITEMS = ("196", "186"), ("242", "302", "50", "181")


def _write_sample_movielens(root: Path) -> None:
    """Synthetic ``ml-100k/u1.base`` / ``u1.test`` (tab-separated user, item, rating, time) with
    every user and item the snippets name present in u1.base."""
    import numpy as np
    from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings

    rows = make_sample_ratings(260, 320, random_state=1)
    rng = np.random.default_rng(0)
    test = rng.random(len(rows)) < 0.2
    base = [r for r, t in zip(rows, test, strict=True) if not t]
    users = {u.lstrip("u") for u, _, _, _ in base}
    items = {i.lstrip("i") for _, i, _, _ in base}
    missing = sorted((set(NEEDED_USERS) - users) | (set(NEEDED_ITEMS) - items))
    assert not missing, f"sample data lacks ids the README uses: {missing}; change the seed"
    write_sample_ratings(root / "ml-100k" / "u1.base", base, fmt="ml-100k")
    write_sample_ratings(
        root / "ml-100k" / "u1.test",
        [r for r, t in zip(rows, test, strict=True) if t],
        fmt="ml-100k",
    )


class _Runner:
    """Runs README blocks in order (each at most once), in the scratch directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[int, BaseException | None] = {}
        self.published = False

    def run_through(self, k: int) -> None:
        for j in range(k + 1):
            if j not in self.done:
                try:
                    self._run(j)
                    self.done[j] = None
                except pytest.skip.Exception:
                    self.done[j] = None  # a peer's block: nothing later depends on it
                    if j == k:
                        raise
                except BaseException as e:
                    self.done[j] = e
                    raise
            elif j == k and self.done[j] is not None:
                raise AssertionError(f"README block {j} failed earlier") from self.done[j]

    def _run(self, j: int) -> None:
        line, code = BLOCKS[j]
        for module, pip_name in PEERS.items():
            uses = re.search(rf"^\s*(from|import)\s+{module}\b", code, re.MULTILINE)
            if uses and importlib.util.find_spec(module) is None:
                pytest.skip(f"README.md:{line} uses {module} (pip install {pip_name})")
        if "Recommender(" in code and not self.published:
            # the README's Serving section publishes the model first (`lrs-rec publish`)
            from lrs_rec.serving.cli import main

            assert main(["publish", "--model", "models/m1"]) == 0
            self.published = True
        namespace: dict[str, Any] = {"__name__": f"readme_block_{j}"}
        exec(compile(code, f"{README}:{line}", "exec"), namespace)
        for value in namespace.values():  # close what the snippet opened (Recommender, ...)
            close = getattr(value, "close", None)
            if type(value).__name__ == "Recommender" and callable(close):
                close()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Runner]:
    from lrs_rec.serving.connection import stop_embedded

    root = tmp_path_factory.mktemp("readme")
    _write_sample_movielens(root)
    home = root / ".lrs-rec-home"
    old_cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRS_HOME", str(home))
        mp.delenv("LRS_REDIS_URL", raising=False)
        mp.chdir(root)
        try:
            yield _Runner(root)
        finally:
            os.chdir(old_cwd)
            stop_embedded(home, save=False)


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5, [line for line, _ in BLOCKS]


@pytest.mark.redis
@pytest.mark.parametrize("k", range(len(BLOCKS)), ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_written(runner: _Runner, k: int) -> None:
    runner.run_through(k)
