"""The gateway under overload, over real HTTP on 127.0.0.1 and the session's Redis: past the
fleet's budget of work not yet written it answers 429 with Retry-After and enqueues nothing;
below it nothing changes; once writers catch up it accepts again. No writer runs: the budget is
filled and freed by hand, so nothing depends on the machine's speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from common.coord.backlog import Outstanding
from common.coord.budget import read_use
from tests.integration.test_gateway import (
    STRUCTURED,
    _gateway,
    event,
    post,
    queued_batches,
    request,
)

pytestmark = pytest.mark.integration


def test_past_the_budget_the_gateway_answers_429_with_retry_after(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given a gateway on a fleet whose budget is two batches, and no writer running
    with _gateway(redis_url, tmp_path, budget_max_batches=2) as url:
        # When three requests come while nothing is written
        first = post(url, event("o-1"), STRUCTURED)
        second = post(url, event("o-2"), STRUCTURED)
        third = post(url, event("o-3"), STRUCTURED)

        # Then the first two are accepted as before, the third refused whole with a delay
        assert (first.status, second.status) == (202, 202)
        assert third.status == 429, third.text
        assert int(third.headers["retry-after"]) >= 1
        assert third.body["retry_after_s"] == int(third.headers["retry-after"])
        assert "budget" in third.body["error"]
        assert sorted(queued_batches(redis_client)) == sorted(
            [first.body["batch_id"], second.body["batch_id"]]
        )

        # And the budget in use and the refusal are in the metrics
        metrics = request(f"{url}/metrics", method="GET").text.splitlines()
        assert "icefleet_budget_batches_in_use 2.0" in metrics
        assert "icefleet_budget_batches_limit 2.0" in metrics
        assert f"icefleet_budget_bytes_in_use {float(read_use(redis_client).bytes)}" in metrics
        assert 'icefleet_http_refused_total{reason="overloaded"} 1.0' in metrics

        # When a writer has written one batch, the same request is accepted
        Outstanding(redis_client).done(first.body["batch_id"])
        again = post(url, event("o-3"), STRUCTURED)
        assert again.status == 202, again.text
        assert json.loads(json.dumps(queued_batches(redis_client)[again.body["batch_id"]])) == [
            event("o-3")
        ]
