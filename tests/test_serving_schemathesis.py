"""A bounded, seeded schemathesis run against the service's own OpenAPI document (issue 16): every
documented operation, a few hundred generated requests (valid and invalid), a real embedded Redis
with a published model. Checks: no 5xx, every status code, content type, header and body conforms to
the document, schema-invalid requests are rejected (4xx). Left out: ``positive_data_acceptance``
(a schema-valid request must get 2xx), which a recommender cannot meet: an item id that matches the
schema's ``string`` but is not in the served catalogue is a 422 naming it, by contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from lrs_rec.serving.app import create_app
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.recommender import Recommender
from lrs_rec.training.testing import random_trained_model, write_model_dir
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    from lrs_rec.serving.connection import stop_embedded

    tmp = tmp_path_factory.mktemp("schemathesis")
    model_dir, home = tmp / "model", tmp / "h"
    write_model_dir(
        random_trained_model(
            n_users=60, n_items=30, d=8, rank=4, sparsity=4, ratings_per_user=5, random_state=7
        ),
        model_dir,
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("LRS_HOME", str(home))
    mp.delenv("LRS_REDIS_URL", raising=False)
    assert cli_main(["publish", "--model", str(model_dir)]) == 0
    rec = Recommender(model_dir, version_refresh_interval=0, max_n=50)
    # an invalid request may also be refused as too large (413): a rejection like 400/422
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
    )
    yield schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(rec, max_body_bytes=8192), config=config
    )
    rec.close()
    stop_embedded(Path(home), save=False)
    mp.undo()


def test_api_conforms_to_its_openapi_document(api_schema):
    # schemathesis's own pytest plugin does not run under this pytest: drive each operation's
    # hypothesis strategy directly (same checks as `case.call_and_validate()` everywhere)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    n = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # no parameters, no body: nothing to make invalid

            @seed(16)  # the number: the same cases every run
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=50,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case) -> None:
                nonlocal n
                n += 1
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            run()
    assert n >= 200
