"""``/docs`` works without internet access (issue 12 §3): the page references no external host and
its Swagger UI assets are served by the app itself."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.docs import ASSETS, swagger_ui_dir
from lrs_rec.serving.recommender import Recommender
from lrs_rec.training.testing import random_trained_model, write_model_dir


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    write_model_dir(random_trained_model(n_users=10, n_items=8, random_state=1), root / "m")
    rec = Recommender(root / "m", home=root / "home")  # lazy: no Redis is needed for /docs
    with TestClient(create_app(rec)) as c:
        yield c


def test_docs_page_references_no_external_host(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    refs += re.findall(r"""url:\s*["']([^"']+)["']""", html)
    assert refs and "/openapi.json" in refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
    assert not re.search(r"https?://", html), "the page names an external host"
    assert '"validatorUrl": null' in html  # no badge fetched from the online validator
    for ref in refs:  # every referenced asset is served here
        got = client.get(ref)
        assert got.status_code == 200, ref


def test_asset_routes_serve_the_installed_swagger_ui(client):
    for name, media in ASSETS.items():
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media, name
        assert r.content == (swagger_ui_dir() / name).read_bytes()
    assert b"SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").content
    for bad in ("index.html", "..%2Fpyproject.toml", "nope.js"):
        assert client.get(f"/docs/assets/{bad}").status_code == 404, bad
    assert client.get("/openapi.json").json()["info"]["title"] == "lrs-rec"
