"""The background warm-up (training.kernel_warmup) compiles exactly what a default `lrs-rec train` calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

# a default train with the warm-up switched off, then every kernel's signatures in that process
CHILD = """
import json, sys
import lrs_rec.training.kernel_warmup as warmup
warmup.start = lambda: None
from lrs_rec.serving.cli import main
from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv
from numba.core.registry import CPUDispatcher
data = write_csv(make_biased_mf(1500, 300, random_state=5), sys.argv[1] + "/r.csv")
assert main(["train", "--ratings", str(data), "--out", sys.argv[1] + "/m", "--quiet",
             "--no-export", "--threads", "2"]) == 0
import lrs_rec.training.kernels as k
print(json.dumps({n: [str(s) for s in f.signatures] for n in dir(k)
                  if isinstance(f := getattr(k, n), CPUDispatcher) and f.signatures}))
"""


# jitted helpers called only from other kernels: a cold compile of the caller registers them too
NESTED = {"_lu_solve", "_cholesky", "_cholesky_solve", "_biased_normal_equations"}


def test_default_train_calls_only_the_warmed_signatures(tmp_path: Path) -> None:
    from lrs_rec.training.kernel_warmup import signatures

    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    called = json.loads(out.stdout.strip().splitlines()[-1])
    listed = {name: sorted(str(s) for s in sigs) for name, sigs in signatures().items()}
    assert called, "the default train called no compiled kernel"
    for name, sigs in called.items():
        if name in NESTED:  # compiled inside their callers (listed there), not called from Python
            continue
        assert name in listed, f"{name} is called by train but not warmed up"
        assert set(sigs) <= set(listed[name]), (name, sigs, listed[name])


def test_start_compiles_every_listed_signature() -> None:
    from lrs_rec.training import kernel_warmup, kernels

    thread = kernel_warmup.start()
    thread.join(timeout=600)
    assert not thread.is_alive()
    for name, sigs in kernel_warmup.signatures().items():
        have = set(getattr(kernels, name).signatures)
        assert set(sigs) <= have, name
