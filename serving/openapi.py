"""The service's OpenAPI document: request bodies whose nested models resolve, every error answer
documented.

The routes parse their bodies themselves (one pydantic-core call, see ``serving.app``), so FastAPI
does not see the request models: :func:`body_schema` puts each model's JSON schema in the operation
with its references pointing at ``#/components/schemas/...`` (pydantic's default ``#/$defs/...``
does not resolve inside an OpenAPI document), and :func:`install` adds those nested models and the
:data:`ERROR_SCHEMA` (``{"error": "..."}``, every 4xx/5xx body) to the components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what went wrong, in one line"}},
}
_DESCRIPTIONS = {
    400: "Malformed request (e.g. both Content-Length and Transfer-Encoding)",
    408: "The request body did not arrive in time",
    413: "Request body too large",
    422: "Invalid request: the message names the field (or the unknown ids)",
    503: "Redis unavailable, no servable model, or the server is busy: retry (Retry-After)",
}

_DEFS: dict[str, dict[str, Any]] = {}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body is ``model``."""
    schema = model.model_json_schema(ref_template=REF)
    _DEFS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route that may answer these error codes with ``{"error": ...}``."""
    return {
        code: {
            "description": _DESCRIPTIONS[code],
            "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
        }
        for code in codes
    }


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` add the error schema and the request bodies' nested models."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, routes=app.routes, openapi_version="3.1.0"
            )
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.setdefault("Error", ERROR_SCHEMA)
            for name, schema in _DEFS.items():
                schemas.setdefault(name, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
