"""A failed job's message is for clients: a plain sentence, never the LLM endpoint, model or a traceback."""

from __future__ import annotations

import logging

from layout_planner import LLMConfig, LLMUnavailable, Planner
from tests.support.service import free_port
from worker.runtime import describe_failure


def test_llm_unavailable_names_neither_the_endpoint_nor_the_model():
    url = f"http://127.0.0.1:{free_port()}/secret-gateway/v1"  # nothing listens there
    planner = Planner(LLMConfig(base_url=url, model="internal-model-7", api_key="k", max_attempts=1,
                                timeout_s=2, backoff_s=0))
    try:
        planner.plan("a cat on a mat")
    except LLMUnavailable as exc:
        raised = exc
    finally:
        planner.close()
    assert "127.0.0.1" in str(raised) or "secret-gateway" in str(raised)  # the real error has the internals
    code, message = describe_failure(raised, "plan")
    assert code == "llm_unavailable"
    for internal in ("127.0.0.1", "secret-gateway", "internal-model-7", "http"):
        assert internal not in message


def test_unexpected_errors_keep_their_text_out_of_the_message():
    code, message = describe_failure(RuntimeError("/srv/models/private-sd at host gpu-7 exploded"), "render")
    assert code == "internal"
    assert "private-sd" not in message and "gpu-7" not in message and "RuntimeError" not in message
