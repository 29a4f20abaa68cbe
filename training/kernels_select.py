"""``lrs-rec train --kernels``: choose the engine's kernel backend without importing numba unless needed."""

from __future__ import annotations


def select_kernels(choice: str = "auto") -> str:
    """numba (an error if it is not installed), numpy (the engine's reference code), or auto (numba
    when importable, else numpy). Returns the backend in use."""
    from lrs_rec.engine.parallel import configure

    if choice not in ("auto", "numba", "numpy"):
        raise ValueError(f"--kernels must be auto, numba or numpy, got {choice!r}")
    if choice == "numpy":
        configure(kernels=None)
        return "numpy"
    try:
        from lrs_rec.training.kernels import install
    except ImportError as e:
        if choice == "numba":
            raise ValueError(f"--kernels numba: numba is not installed ({e})") from None
        configure(kernels=None)
        return "numpy"
    install()
    return "numba"
