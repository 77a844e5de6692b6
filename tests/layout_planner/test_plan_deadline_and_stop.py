"""One planning call is bounded as a whole, and a stop request ends it between LLM requests."""

from __future__ import annotations

import pytest

from layout_planner import LLMConfig, LLMUnavailable, PlanCanceled, Planner


def _planner(fake_llm, **config) -> Planner:
    values = dict(base_url=fake_llm.base_url, model="fake-model", api_key="k", timeout_s=0.5, backoff_s=0.01,
                  max_attempts=10, structured_output="off")
    values.update(config)
    return Planner(LLMConfig(**values))


def test_a_hanging_endpoint_is_given_up_at_the_deadline_not_after_every_attempt(fake_llm):
    for _ in range(10):
        fake_llm.enqueue_timeout(delay_s=2.0)
    planner = _planner(fake_llm, deadline_s=1.2)
    with pytest.raises(LLMUnavailable, match="deadline"):
        planner.plan("a cat on a mat")
    planner.close()
    assert 2 <= len(fake_llm.requests) <= 3  # 0.5 s per attempt: the 1.2 s deadline leaves room for about 3, not 10


def test_a_stop_request_ends_the_call_before_the_next_attempt(fake_llm):
    for _ in range(10):
        fake_llm.enqueue_timeout(delay_s=2.0)
    planner = _planner(fake_llm)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(fake_llm.requests) >= 1  # the cancel arrives while the first request hangs

    with pytest.raises(PlanCanceled):
        planner.plan("a cat on a mat", should_cancel=stop)
    planner.close()
    assert len(fake_llm.requests) == 1 and asked
