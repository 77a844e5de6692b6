"""``conditioning`` through the service: real API, plan and render worker processes, the tiny SD
and tiny ELLA/GlueNet files. A generate with ella succeeds end to end and its instruct keeps
the conditioning; an unknown conditioning is a 422; a missing checkpoint ends the job
model_unavailable naming the setting."""

from __future__ import annotations

import json

import pytest
import redis

from jobs.files import job_dir
from tests.support.builders import box_object, layout_data
from tests.support.fake_llm import FakeLLM
from tests.support.service import APIProcess, WorkerProcess, service_settings, settings_env, wait_for_job
from tests.support.tiny_sd import tiny_sd_path  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow

LAYOUT = layout_data(box_object("ball", "a red ball", [0.2, 0.2, 0.7, 0.7]), background="a park")
MOVED = {"objects": [{"id": "ball", "phrase": "a red ball", "box": [200, 40, 250, 250]}], "background": "a park", "negative": ""}
ENDED = {"succeeded", "failed", "canceled"}


@pytest.fixture(scope="module")
def stack(private_redis, tiny_sd_path, tiny_conditioning_files, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("conditioning_service")
    llm = FakeLLM()
    settings = service_settings(
        private_redis.url, tmp / "data", sd_model=str(tiny_sd_path), device="cpu", dtype="float32", torch_threads=1,
        ella_checkpoint=str(tiny_conditioning_files["ella"]), ella_t5=str(tiny_conditioning_files["t5"]),
        gluenet_xlmr=str(tiny_conditioning_files["xlmr"]),  # and no GlueNet checkpoint at all
    )
    env = {**settings_env(settings), **llm.env()}
    api = APIProcess(env, tmp / "api.log")
    client = api.client()
    workers = []
    try:
        api.wait_ready()
        for queue in ("plan", "render"):
            workers.append(WorkerProcess(queue, env, tmp / f"{queue}.log").wait_ready(redis.Redis(port=private_redis.port)))
        yield client, llm, settings, workers
    finally:
        for worker in workers:
            worker.stop()
        client.close()
        api.stop()
        llm.close()


def test_unknown_conditioning_and_language_are_422(stack):
    client, *_ = stack
    for body, where in (({"conditioning": "t5"}, "conditioning"), ({"conditioning": "gluenet", "language": "French"}, "language")):
        answer = client.post("/generate", json={"prompt": "a red ball in a park", **body})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"][-1] == where


def test_ella_end_to_end_and_instruct_keeps_it(stack):
    client, llm, settings, workers = stack
    accepted = client.post("/generate", json={"layout": LAYOUT, "conditioning": "ella", "width": 64, "height": 64, "steps": 3})
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["job_id"], ENDED)
    assert job["state"] == "succeeded", (job, [w.log() for w in workers])
    assert job["conditioning"] == "ella"
    report = json.loads((job_dir(settings.data_dir, job["job_id"]) / "report.json").read_text())
    assert report["conditioning"] == "ella" and [s["name"] for s in report["stages"]] == ["per_box", "masks", "final"]

    llm.enqueue(MOVED)
    turn2 = client.post(f"/sessions/{job['session_id']}/instruct", json={"instruction": "move the ball right"})
    assert turn2.status_code == 202, turn2.text
    second = wait_for_job(client, turn2.json()["job_id"], ENDED)
    assert second["state"] == "succeeded" and second["conditioning"] == "ella", (second, [w.log() for w in workers])


def test_a_missing_checkpoint_ends_the_job_model_unavailable_naming_the_setting(stack):
    client, llm, _, workers = stack
    accepted = client.post("/generate", json={"layout": LAYOUT, "prompt": "une balle rouge dans un parc", "conditioning": "gluenet",
                                              "width": 64, "height": 64, "steps": 2})
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["job_id"], ENDED)
    assert job["state"] == "failed" and job["error"]["code"] == "model_unavailable", (job, [w.log() for w in workers])
    assert "LMD_GLUENET_CHECKPOINTS" in job["error"]["message"]
