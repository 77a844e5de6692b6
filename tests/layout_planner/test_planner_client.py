"""The planner against a real local OpenAI-compatible server: faults, retries, re-asks, cache (docs/method.md §1.2-1.6)."""

import json
import socket

import pytest

from layout_planner import (
    InMemoryCache,
    InvalidPrompt,
    Layout,
    LayoutObject,
    LLMBadOutput,
    LLMConfig,
    LLMUnavailable,
    Planner,
    cache_key,
)
from layout_planner.template import Template, load_template


def _layout(*phrases: str) -> Layout:
    objects = [LayoutObject(id=f"o{i}", phrase=p, box=(0.1 * i, 0.1, 0.1 * i + 0.1, 0.3)) for i, p in enumerate(phrases)]
    return Layout(objects=objects, background="a garden")


def test_a_plan_sends_template_caption_and_settings(fake_llm):
    fake_llm.enqueue(_layout("a cat", "a dog"))
    layout, report = Planner(fake_llm.config(temperature=0.25, max_tokens=900)).plan_with_report("a cat and a dog")
    assert layout.phrases() == ["a cat", "a dog"] and layout.background == "a garden"
    (request,) = fake_llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer test-key"
    body = request.body
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("fake-model", 0.25, 900)
    assert body["messages"][0] == {"role": "system", "content": load_template().text}
    assert body["messages"][1] == {"role": "user", "content": "Caption: a cat and a dog"}
    assert body["response_format"]["type"] == "json_schema"
    assert (report.asks, report.attempts, report.structured) == (1, 1, True)


def test_the_template_has_seven_examples_and_asks_for_english():
    text = load_template().text
    assert text.count("\nCaption: ") == 7 and text.count("\nInstruction: ") == 1 and text.count("\nLayout: ") == 8
    assert "English" in text and 2500 < len(text) < 4500
    for asked in ("512 x 512", "top-left", "inside the canvas", "One box holds exactly one object", "avoid overlapping",
                  "not tiny", "Style words", "excludes", "whole updated layout, not only what changed"):  # fmt: skip
        assert asked in text, asked
    for line in text.splitlines():  # every example answer is a valid layout inside the canvas
        if line.startswith("Layout: "):
            for obj in json.loads(line[len("Layout: ") :])["objects"]:
                x, y, w, h = obj["box"]
                assert x >= 0 and y >= 0 and x + w <= 512 and y + h <= 512


def test_a_500_is_retried(fake_llm):
    fake_llm.enqueue_status(500)
    layout, report = Planner(fake_llm.config()).plan_with_report("a cat")
    assert layout.phrases() == ["a cat"]
    assert (len(fake_llm.requests), report.attempts, len(report.waits)) == (2, 2, 1)


def test_retry_after_is_honoured_up_to_the_cap(fake_llm):
    fake_llm.enqueue_status(429, retry_after="0.02")
    fake_llm.enqueue_status(429, retry_after=120)
    _, report = Planner(fake_llm.config(max_retry_after_s=0.05)).plan_with_report("a cat")
    assert report.attempts == 3
    assert report.waits == [0.02, 0.05]  # the server's wait, then the cap instead of 120 s


def test_backoff_grows_exponentially_with_bounded_jitter(fake_llm):
    for _ in range(3):
        fake_llm.enqueue_status(502)
    _, report = Planner(fake_llm.config(backoff_s=0.01, max_backoff_s=1.0)).plan_with_report("a cat")
    assert report.attempts == 4 and len(report.waits) == 3
    for n, wait in enumerate(report.waits):
        assert 0.01 * 2**n <= wait <= 0.01 * 2**n + 0.01


def test_persistent_5xx_gives_llm_unavailable_after_max_attempts(fake_llm):
    for _ in range(5):
        fake_llm.enqueue_status(503, message="overloaded")
    with pytest.raises(LLMUnavailable, match=r"HTTP 503 after 3 attempts: overloaded") as info:
        Planner(fake_llm.config(max_attempts=3)).plan("a cat")
    assert info.value.attempts == 3 and len(fake_llm.requests) == 3


def test_rate_limit_that_never_ends_names_429(fake_llm):
    for _ in range(2):
        fake_llm.enqueue_status(429, retry_after=0)
    with pytest.raises(LLMUnavailable, match=r"rate limiting \(429\) after 2 attempts"):
        Planner(fake_llm.config(max_attempts=2)).plan("a cat")
    assert len(fake_llm.requests) == 2


def test_timeouts_are_retried_then_reported(fake_llm):
    fake_llm.enqueue_timeout(2.0)
    fake_llm.enqueue_timeout(2.0)
    with pytest.raises(LLMUnavailable, match=r"timed out \(0.3 s per request\) after 2 attempts"):
        Planner(fake_llm.config(timeout_s=0.3, max_attempts=2)).plan("a cat")
    assert len(fake_llm.requests) == 2


def test_a_timeout_then_success(fake_llm):
    fake_llm.enqueue_timeout(2.0)
    _, report = Planner(fake_llm.config(timeout_s=0.3)).plan_with_report("a cat")
    assert report.attempts == 2


def test_a_malformed_body_is_retried(fake_llm):
    fake_llm.enqueue_malformed()
    layout, report = Planner(fake_llm.config()).plan_with_report("a cat")
    assert layout.phrases() == ["a cat"] and report.attempts == 2


def test_an_unreachable_endpoint(fake_llm):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = fake_llm.config(base_url=f"http://127.0.0.1:{port}/v1", max_attempts=2)
    with pytest.raises(LLMUnavailable, match="cannot reach LLM endpoint .* after 2 attempts") as info:
        Planner(config).plan("a cat")
    assert info.value.attempts == 2


def test_openai_without_a_key_is_refused_before_any_request():
    with pytest.raises(LLMUnavailable, match=r"^LLM endpoint https://api.openai.com/v1 needs an API key") as info:
        Planner(LLMConfig(api_key=None)).plan("a cat")
    assert info.value.attempts == 0


def test_retries_are_reported_as_they_happen(fake_llm):
    fake_llm.enqueue_status(503)
    fake_llm.enqueue_timeout(2.0)
    notes = []
    Planner(fake_llm.config(timeout_s=0.3), on_retry=notes.append).plan("a cat")
    assert [n.split(";")[0] for n in notes] == ["HTTP 503", "no answer within 0.3 s"]
    assert "attempt 1 of 4, next in" in notes[0] and "attempt 2 of 4, next in" in notes[1]


def test_a_client_error_is_not_retried(fake_llm):
    fake_llm.enqueue_status(401, message="invalid api key")
    with pytest.raises(LLMUnavailable, match="refused the request with HTTP 401: invalid api key"):
        Planner(fake_llm.config()).plan("a cat")
    assert len(fake_llm.requests) == 1


def test_bad_output_is_reasked_with_the_parse_error(fake_llm):
    fake_llm.enqueue_truncated()
    fake_llm.enqueue_empty()
    fake_llm.enqueue("I would rather not.")
    with pytest.raises(LLMBadOutput, match="no usable layout in 3 asks; last problem: the answer is neither") as info:
        Planner(fake_llm.config(max_reasks=3)).plan("a cat")
    assert info.value.asks == 3 and info.value.last_text == "I would rather not."
    assert len(fake_llm.requests) == 3
    second, third = fake_llm.requests[1], fake_llm.requests[2]
    assert "not closed (truncated answer?)" in second.last_user_content
    assert "cut at max_tokens=900" in second.last_user_content
    assert second.messages[-2]["role"] == "assistant"  # the bad answer is shown back to the model
    assert "the answer is empty" in third.last_user_content


def test_a_reask_that_succeeds(fake_llm):
    fake_llm.enqueue('{"objects": [{"phrase": "a cat"}]}')
    layout, report = Planner(fake_llm.config()).plan_with_report("a cat")
    assert layout.phrases() == ["a cat"]
    assert report.asks == 2 and "box must be 4 numbers" in report.parse_errors[0]


def test_an_answer_cut_at_max_tokens_is_asked_again(fake_llm):
    cut = '{"objects": [{"id": "cat", "phrase": "a cat", "box": [10, 10, 100, 100]}, {"id": "dog", "phrase": "a d'
    fake_llm.enqueue(cut, finish_reason="length")
    fake_llm.enqueue(_layout("a cat", "a dog"))
    layout, report = Planner(fake_llm.config()).plan_with_report("a cat and a dog")
    assert layout.phrases() == ["a cat", "a dog"] and report.asks == 2
    assert "stops mid-way" in report.parse_errors[0] and "cut at max_tokens=900" in report.parse_errors[0]


def test_structured_output_falls_back_and_remembers(fake_llm):
    fake_llm.reject_response_format = True
    planner = Planner(fake_llm.config(structured_output="auto"))
    layout, report = planner.plan_with_report("a cat")
    assert layout.phrases() == ["a cat"] and report.structured is False
    assert ["response_format" in r.body for r in fake_llm.requests] == [True, False]
    planner.plan("a dog")  # remembered: no second rejected request
    assert ["response_format" in r.body for r in fake_llm.requests] == [True, False, False]


def test_a_reasoning_model_gets_max_completion_tokens_and_its_default_temperature(fake_llm):
    # What OpenAI's o-series and gpt-5 models answer to max_tokens and a temperature.
    fake_llm.reject_params = {
        "max_tokens": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
        "temperature": "Unsupported value: 'temperature' does not support 0.25 with this model. Only the default (1) value is supported.",
    }
    planner = Planner(fake_llm.config())
    layout, report = planner.plan_with_report("a cat")
    assert layout.phrases() == ["a cat"] and report.attempts == 1 and report.structured
    last = fake_llm.requests[-1].body
    assert last["max_completion_tokens"] == 900 and "max_tokens" not in last and "temperature" not in last
    assert last["response_format"]["type"] == "json_schema"  # not dropped for a 400 about something else
    assert len(fake_llm.requests) == 3
    planner.plan("a dog")  # remembered: one request
    assert len(fake_llm.requests) == 4 and "max_completion_tokens" in fake_llm.requests[-1].body


def test_a_400_about_something_else_is_not_retried(fake_llm):
    fake_llm.reject_params = {"messages": "Invalid 'messages[1].content': string too long."}
    with pytest.raises(LLMUnavailable, match="HTTP 400: Invalid 'messages\\[1\\].content': string too long"):
        Planner(fake_llm.config(structured_output="off")).plan("a cat")
    assert len(fake_llm.requests) == 1


def test_structured_output_forced_or_off(fake_llm):
    fake_llm.reject_response_format = True
    with pytest.raises(LLMUnavailable, match="HTTP 400: response_format is not supported"):
        Planner(fake_llm.config(structured_output="json_schema")).plan("a cat")
    Planner(fake_llm.config(structured_output="off")).plan("a cat")
    assert ["response_format" in r.body for r in fake_llm.requests] == [True, False]


def test_completions_mode_for_base_models(fake_llm):
    fake_llm.enqueue("[('a cat', [100, 100, 200, 200])]\nBackground prompt: a sofa\nNegative prompt: None")
    layout = Planner(fake_llm.config(mode="completions")).plan("a cat on a sofa")
    assert layout.phrases() == ["a cat"] and layout.background == "a sofa"
    (request,) = fake_llm.requests
    assert request.path == "/v1/completions"
    assert request.body["prompt"].startswith(load_template().text.rstrip())
    assert request.body["prompt"].endswith("Caption: a cat on a sofa\nLayout:")
    assert "\nCaption:" in request.body["stop"]


def test_a_non_english_prompt_gives_english_phrases(fake_llm):
    fake_llm.enqueue(
        {
            "objects": [{"id": "dog", "phrase": "a brown dog", "box": [40, 200, 200, 220]}, {"id": "ball", "phrase": "a red ball", "box": [320, 330, 100, 100]}],
            "background": "a realistic photo of a garden",
            "negative": "",
        }
    )
    layout = Planner(fake_llm.config()).plan("Un perro marrón jugando con una pelota roja en el jardín")
    assert fake_llm.requests[0].last_user_content == "Caption: Un perro marrón jugando con una pelota roja en el jardín"
    assert "English" in fake_llm.requests[0].messages[0]["content"]
    assert layout.phrases() == ["a brown dog", "a red ball"] and layout.background == "a realistic photo of a garden"


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "the prompt is empty"),
        ("   \n\t ", "the prompt is empty"),
        ("x" * 51, "the prompt has 51 characters; the limit is 50"),
        ("a cat\x00 on a mat", r"control character U\+0000 at position 5"),
        ("a cat\x1b[31m", r"control character U\+001B"),
    ],
)
def test_invalid_prompts_are_refused_before_any_request(fake_llm, prompt, message):
    with pytest.raises(InvalidPrompt, match=message):
        Planner(fake_llm.config(max_prompt_chars=50)).plan(prompt)
    assert fake_llm.requests == []


def test_the_cache_key_covers_template_model_settings_prompt_and_sample(fake_llm):
    cache = InMemoryCache()
    planner = Planner(fake_llm.config(), cache=cache)
    first = planner.plan("a cat")
    assert planner.plan("a cat") == first and len(fake_llm.requests) == 1
    _, report = planner.plan_with_report("a cat")
    assert report.cached and report.attempts == 0
    planner.plan("a cat", sample_index=1)
    Planner(fake_llm.config(temperature=0.7), cache=cache).plan("a cat")
    Planner(fake_llm.config(model="other-model"), cache=cache).plan("a cat")
    assert len(fake_llm.requests) == 4
    base = ("sha", "m", 0.25, 900, "a cat", 0)
    keys = {cache_key(*base), cache_key("sha2", *base[1:]), cache_key(*base[:3], 901, *base[4:]), cache_key(*base[:4], "a dog", 0)}
    assert len(keys) == 4
    assert cache.get(cache_key(load_template().sha256, "fake-model", 0.25, 900, "a cat", 0)) is not None


def test_editing_the_template_changes_the_cache_key(fake_llm):
    cache = InMemoryCache()
    Planner(fake_llm.config(), cache=cache).plan("a cat")
    edited = Planner(fake_llm.config(), cache=cache)
    edited.template = Template(version=edited.template.version, text=edited.template.text + "Never draw dogs.\n")
    edited.plan("a cat")  # same version name, model, settings and prompt: only the text differs
    assert len(fake_llm.requests) == 2 and len(cache) == 2
    assert fake_llm.requests[1].messages[0]["content"].endswith("Never draw dogs.\n")


def test_a_corrupt_cache_entry_is_replaced(fake_llm):
    cache = InMemoryCache()
    planner = Planner(fake_llm.config(), cache=cache)
    key = cache_key(load_template().sha256, "fake-model", 0.25, 900, "a cat", 0)
    cache.set(key, "not a layout")
    assert planner.plan("a cat").phrases() == ["a cat"]
    assert len(fake_llm.requests) == 1 and cache.get(key) != "not a layout"
