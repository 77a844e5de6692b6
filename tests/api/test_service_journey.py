"""The whole service as a client sees it: real Celery worker processes, the tiny local model, the fake LLM.

One stack per module, as deployed without docker: a private Redis, ``lmd serve``, and two
``lmd worker`` processes (plan, render), all real subprocesses; the test is an HTTP client.
generate -> poll -> image and overlay -> instruct -> session with two turns; progress seen
to advance and a running job canceled; a planner failure with its code; and last, a render
worker SIGKILLed mid-job whose job is re-enqueued by the reaper and finished by a new worker.
Before the worker is killed, ``conditioning``: a generate with ella end to end (its instruct keeps
it), an unknown value is a 422, a missing GlueNet checkpoint ends the job model_unavailable.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import redis

from PIL import Image

from jobs.files import job_dir

from tests.support.builders import box_object, layout_data
from tests.support.fake_llm import FakeLLM
from tests.support.service import APIProcess, WorkerProcess, service_settings, settings_env, wait_for_job
from tests.support.tiny_sd import tiny_sd_path  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow

FIRST = {
    "objects": [
        {"id": "cat", "phrase": "a cat", "box": [40, 200, 200, 200]},
        {"id": "dog", "phrase": "a dog", "box": [300, 180, 180, 240]},
    ],
    "background": "a realistic living room",
    "negative": "",
}
REVISED = {**FIRST, "objects": [FIRST["objects"][0], {"id": "dog", "phrase": "a dog", "box": [300, 20, 180, 200]}]}
GIVEN_LAYOUT = layout_data(box_object("ball", "a red ball", [0.2, 0.2, 0.7, 0.7]), background="a park")


class Stack:
    def __init__(self, settings, env, client, redis_client, llm, tmp):
        self.settings, self.env, self.client, self.redis, self.llm, self.tmp = settings, env, client, redis_client, llm, tmp
        self.workers: dict[str, WorkerProcess] = {}

    def start_worker(self, queue: str) -> WorkerProcess:
        worker = WorkerProcess(queue, self.env, self.tmp / f"{queue}-{len(self.workers)}.log")
        self.workers[f"{queue}-{len(self.workers)}"] = worker
        return worker.wait_ready(self.redis)

    def logs(self) -> str:
        logs = [f"--- {name}\n{w.log()}" for name, w in self.workers.items()]
        return "\n".join(logs + [f"--- api\n{self.api.log_path.read_text(errors='replace')[-3000:]}"])


@pytest.fixture(scope="module")
def stack(private_redis, tiny_sd_path, tiny_conditioning_files, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("service")
    llm = FakeLLM()
    settings = service_settings(
        private_redis.url,
        tmp / "data",
        sd_model=str(tiny_sd_path),
        device="cpu",
        dtype="float32",
        torch_threads=1,
        heartbeat_s=0.3,
        worker_lost_after_s=5.0,
        reaper_interval_s=0.5,
        max_redeliveries=2,
        max_batch=2,
        # tiny ELLA files for tests/api/test_conditioning_service.py, which shares this stack; no GlueNet checkpoint
        ella_checkpoint=str(tiny_conditioning_files["ella"]),
        ella_t5=str(tiny_conditioning_files["t5"]),
        gluenet_xlmr=str(tiny_conditioning_files["xlmr"]),
    )
    env = {**settings_env(settings), **llm.env()}
    api = APIProcess(env, tmp / "api.log")
    client = api.client()
    s = Stack(settings, env, client, redis.Redis(port=private_redis.port), llm, tmp)
    s.api = api
    try:
        api.wait_ready()
        s.start_worker("plan")
        s.start_worker("render")
        yield s
    finally:
        for worker in s.workers.values():
            worker.stop()
        client.close()
        api.stop()
        llm.close()


@pytest.fixture
def api(stack):
    yield stack.client
    stack.llm.replies.clear()


def _png(response, size):
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == size
    return image.convert("RGB")


def test_readyz_reports_both_workers(api):
    ready = api.get("/readyz").json()
    assert ready["queues_without_workers"] == []
    assert sorted(q for w in ready["workers"] for q in w["queues"]) == ["plan", "render"]


def test_generate_then_instruct_journey(api, stack):
    stack.llm.enqueue(FIRST)
    accepted = api.post("/generate", json={"prompt": "a cat and a dog in a living room", "width": 64, "height": 48,
                                           "steps": 4, "seed": 11})
    assert accepted.status_code == 202, accepted.text
    job_id, session_id = accepted.json()["job_id"], accepted.json()["session_id"]

    events = []
    with api.stream("GET", f"/jobs/{job_id}/events") as stream:  # server-sent events until the job ends
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append((line[6:].strip(), None))
            elif line.startswith("data:"):
                events[-1] = (events[-1][0], json.loads(line[5:]))
    assert events[-1] == ("end", {"job_id": job_id, "state": "succeeded"}), stack.logs()
    states = [data for name, data in events[:-1]]
    assert {name for name, _ in events[:-1]} == {"state"}
    seen = [s["state"] for s in states]
    assert seen[-1] == "succeeded", stack.logs()
    assert any(s["progress"]["total"] == 4 and 0 < s["progress"]["step"] for s in states if s["state"] == "rendering")
    assert "rendering" in seen and seen.index("rendering") < len(seen) - 1
    order = ["queued", "planning", "rendering", "succeeded"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)

    job = api.get(f"/jobs/{job_id}").json()
    assert [o["id"] for o in job["layout"]["objects"]] == ["cat", "dog"]
    assert job["seed"] == 11 and job["error"] is None and job["deliveries"] == 1
    assert job["progress"]["step"] == job["progress"]["total"] > 0
    image = _png(api.get(job["result"]["image_url"]), (64, 48))
    overlay = _png(api.get(job["result"]["overlay_url"]), (64, 48))
    assert image.tobytes() != overlay.tobytes()

    stack.llm.enqueue(REVISED)
    turn2 = api.post(f"/sessions/{session_id}/instruct", json={"instruction": "move the dog up"})
    assert turn2.status_code == 202 and turn2.json()["turn"] == 2
    second = wait_for_job(api, turn2.json()["job_id"], {"succeeded", "failed", "canceled"})
    assert second["state"] == "succeeded", (second, stack.logs())
    assert second["seed"] == 11 and (second["width"], second["height"], second["steps"]) == (64, 48, 4)
    _png(api.get(second["result"]["image_url"]), (64, 48))

    revision_request = stack.llm.requests[-1]
    contents = " ".join(m["content"] for m in revision_request.messages)
    assert "a cat and a dog in a living room" in contents and "move the dog up" in contents

    session = api.get(f"/sessions/{session_id}").json()
    assert [(t["turn"], t["kind"], t["state"]) for t in session["turns"]] == [
        (1, "generate", "succeeded"), (2, "instruct", "succeeded")]
    boxes = [{o["id"]: o["box"] for o in t["layout"]["objects"]} for t in session["turns"]]
    assert boxes[0]["cat"] == boxes[1]["cat"] and boxes[0]["dog"] != boxes[1]["dog"]


def test_a_repeated_prompt_is_planned_from_the_llm_cache_in_redis(api, stack):
    asked = len(stack.llm.requests)
    accepted = api.post("/generate", json={"prompt": "a cat and a dog in a living room", "width": 64, "height": 48,
                                           "steps": 2, "seed": 11, "preset": "fast"})
    job = wait_for_job(api, accepted.json()["job_id"], {"succeeded", "failed", "canceled"})
    assert job["state"] == "succeeded", (job, stack.logs())
    assert len(stack.llm.requests) == asked  # no new LLM call
    # Third render of this render worker: the pipeline was loaded once, by its pool child.
    render = next(w for name, w in stack.workers.items() if name.startswith("render"))
    assert render.log_path.read_text().count(f"loading {stack.settings.sd_model}") == 1
    # The request's preset and the worker's LMD_MAX_BATCH reached stage 2's options.
    report = json.loads((stack.settings.data_dir / "jobs" / job["job_id"] / "report.json").read_text())
    assert (job["preset"], job["variant"]) == ("fast", "lmd")
    assert (report["options"]["per_box_full_pass"], report["options"]["max_batch"], report["options"]["steps"]) == (False, 2, 2)
    assert [o["id"] for o in job["layout"]["objects"]] == ["cat", "dog"]
    assert list(stack.redis.scan_iter(match="lmd:llm:*"))
    assert all(0 < stack.redis.ttl(k) <= stack.settings.retention_s for k in stack.redis.scan_iter(match="lmd:llm:*"))


def test_progress_advances_and_cancel_ends_a_running_job(api, stack):
    accepted = api.post("/generate", json={"layout": GIVEN_LAYOUT, "width": 64, "height": 64, "steps": 200, "seed": 1})
    job_id = accepted.json()["job_id"]
    steps_seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if job["state"] == "rendering" and job["progress"]["total"]:
            steps_seen.append((job["progress"]["stage"], job["progress"]["step"]))
            if len({s for _, s in steps_seen}) >= 2:
                break
        assert job["state"] in ("queued", "rendering"), (job, stack.logs())
        time.sleep(0.05)
    assert len({s for _, s in steps_seen}) >= 2, steps_seen  # progress advanced while we watched

    canceled = api.post(f"/jobs/{job_id}/cancel")
    assert canceled.status_code == 202 and canceled.json()["cancel_requested"]
    job = wait_for_job(api, job_id, {"succeeded", "failed", "canceled"})
    assert job["state"] == "canceled", (job, stack.logs())
    assert job["error"]["code"] == "canceled"
    assert job["progress"]["step"] < job["progress"]["total"] == 200
    assert api.get(f"/jobs/{job_id}/image").status_code == 409


def test_an_unreachable_llm_fails_the_job_with_its_code(api, stack):
    for _ in range(stack.settings.llm_max_attempts):
        stack.llm.enqueue_status(503, "overloaded")
    accepted = api.post("/generate", json={"prompt": "a cat", "width": 64, "height": 64, "steps": 2})
    job = wait_for_job(api, accepted.json()["job_id"], {"succeeded", "failed", "canceled"})
    assert job["state"] == "failed" and job["error"]["code"] == "llm_unavailable", job
    # A plain message: the endpoint and model stay in the worker's log.
    message = job["error"]["message"]
    assert "could not be reached" in message
    endpoint = stack.env["LMD_LLM_BASE_URL"]
    assert endpoint not in message and "127.0.0.1" not in message and "http" not in message


# --- conditioning (docs/conditioning.md): the stack's settings name tiny ELLA files and no GlueNet checkpoint ---
BALL_LAYOUT = layout_data(box_object("ball", "a red ball", [0.2, 0.2, 0.7, 0.7]), background="a park")
BALL_MOVED = {"objects": [{"id": "ball", "phrase": "a red ball", "box": [200, 40, 250, 250]}], "background": "a park", "negative": ""}
ENDED = {"succeeded", "failed", "canceled"}


def test_unknown_conditioning_and_language_are_422(stack):
    client = stack.client
    for body, where in (({"conditioning": "t5"}, "conditioning"), ({"conditioning": "gluenet", "language": "French"}, "language")):
        answer = client.post("/generate", json={"prompt": "a red ball in a park", **body})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"][-1] == where


def test_ella_end_to_end_and_instruct_keeps_it(stack):
    client, llm, settings, workers = stack.client, stack.llm, stack.settings, list(stack.workers.values())
    accepted = client.post("/generate", json={"layout": BALL_LAYOUT, "conditioning": "ella", "width": 64, "height": 64, "steps": 3})
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["job_id"], ENDED)
    assert job["state"] == "succeeded", (job, [w.log() for w in workers])
    assert job["conditioning"] == "ella"
    report = json.loads((job_dir(settings.data_dir, job["job_id"]) / "report.json").read_text())
    assert report["conditioning"] == "ella" and [s["name"] for s in report["stages"]] == ["per_box", "masks", "final"]

    llm.enqueue(BALL_MOVED)
    turn2 = client.post(f"/sessions/{job['session_id']}/instruct", json={"instruction": "move the ball right"})
    assert turn2.status_code == 202, turn2.text
    second = wait_for_job(client, turn2.json()["job_id"], ENDED)
    assert second["state"] == "succeeded" and second["conditioning"] == "ella", (second, [w.log() for w in workers])


def test_gluenet_without_a_checkpoint_is_refused_when_accepted_before_any_llm_call(stack):
    """This stack has no GlueNet checkpoint: the job is refused at once (422), not planned (an LLM
    call) and then failed by the render worker."""
    client, llm = stack.client, stack.llm
    asked = len(llm.requests)
    answer = client.post("/generate", json={"prompt": "une balle rouge dans un parc", "conditioning": "gluenet",
                                            "width": 64, "height": 64, "steps": 2})
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "conditioning"]
    assert error["msg"] == "conditioning gluenet is not available on this server (its files are not installed)"
    time.sleep(1.0)  # a queued job would reach the plan worker and the fake LLM within this
    assert len(llm.requests) == asked


def test_a_render_worker_killed_mid_job_is_replaced_and_the_job_completes(api, stack):
    accepted = api.post("/generate", json={"layout": GIVEN_LAYOUT, "width": 64, "height": 64, "steps": 12, "seed": 5})
    job_id = accepted.json()["job_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        if job["state"] == "rendering" and job["progress"]["step"] >= 1:
            break
        time.sleep(0.05)
    render = next(w for name, w in stack.workers.items() if name.startswith("render") and w.process.poll() is None)
    render.kill()  # main process and pool child: nobody acks, nobody beats

    stack.start_worker("render")  # the plan worker's reaper (or this one's) re-enqueues the stale job
    job = wait_for_job(api, job_id, {"succeeded", "failed", "canceled"})
    assert job["state"] == "succeeded", (job, stack.logs())
    assert job["deliveries"] == 2
    _png(api.get(f"/jobs/{job_id}/image"), (64, 64))


def test_a_render_past_the_soft_time_limit_fails_with_timeout(api, stack):
    for name, worker in list(stack.workers.items()):
        if name.startswith("render"):
            worker.stop()
    limited = WorkerProcess("render", {**stack.env, "LMD_TASK_SOFT_TIME_LIMIT_S": "2", "LMD_TASK_TIME_LIMIT_S": "30"},
                            stack.tmp / "render-limited.log")
    stack.workers["render-limited"] = limited
    limited.wait_ready(stack.redis)
    # The pool child loads the model as it starts, before any job (so no job's time limit pays for it).
    deadline = time.monotonic() + 90
    while "pipeline loaded in" not in limited.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "pipeline loaded in" in limited.log_path.read_text(), limited.log()
    accepted = api.post("/generate", json={"layout": GIVEN_LAYOUT, "width": 64, "height": 64, "steps": 400})
    job = wait_for_job(api, accepted.json()["job_id"], {"succeeded", "failed", "canceled"})
    assert job["state"] == "failed" and job["error"]["code"] == "timeout", (job, stack.logs())
    assert "LMD_TASK_SOFT_TIME_LIMIT_S" in job["error"]["message"], job


def test_metrics_show_the_journeys_renders_failures_and_workers(api, stack):
    from prometheus_client.parser import text_string_to_metric_families

    text = api.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    succeeded = samples[("lmd_jobs_finished_total", (("state", "succeeded"),))]
    assert succeeded >= 4 and samples[("lmd_render_seconds_count", ())] == succeeded
    assert samples[("lmd_render_seconds_sum", ())] > 0
    assert samples[("lmd_render_seconds_bucket", (("le", "+Inf"),))] == succeeded
    assert samples[("lmd_jobs_failed_total", (("code", "llm_unavailable"),))] == 1
    assert samples[("lmd_jobs_failed_total", (("code", "timeout"),))] == 1
    assert samples[("lmd_workers", (("queue", "render"),))] >= 1
