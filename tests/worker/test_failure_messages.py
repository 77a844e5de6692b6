"""A failed job's message is for clients: a plain sentence, never the LLM endpoint, model or a traceback."""

from __future__ import annotations

import logging

import pytest
import torch

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


@pytest.mark.parametrize("t5, internal", [
    ("/srv/operator-private/models/t5", "operator-private"),  # a directory under the operator's private path
    ("operator-org/private-t5", "private-t5"),  # the hub client's message (offline here)
])
def test_a_conditioning_failure_shows_neither_the_operators_paths_nor_a_librarys_text(t5, internal, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from grounded_sd.conditioning.loading import ConditioningConfig, load_conditioning
    from grounded_sd.errors import ConditioningUnavailable

    with pytest.raises(ConditioningUnavailable) as raised:
        load_conditioning("ella", ConditioningConfig(ella_t5=t5), device="cpu", dtype=torch.float32)
    assert internal in str(raised.value)  # the operator's log gets the cause
    code, message = describe_failure(raised.value, "render")
    assert code == "model_unavailable"
    assert internal not in message and "/" not in message and "hub" not in message.lower(), message


def test_a_language_without_a_gluenet_checkpoint_is_named_to_the_client():
    from grounded_sd.errors import ConditioningUnavailable

    exc = ConditioningUnavailable("gluenet has no checkpoint for 'de' (configured: zh; set /w/x.ckpt)",
                                  public="gluenet has no checkpoint for the prompt's language 'de' (this service has: zh)")
    code, message = describe_failure(exc, "render")
    assert code == "model_unavailable" and "'de'" in message and "/w/" not in message
