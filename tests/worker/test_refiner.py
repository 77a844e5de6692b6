"""The render worker with an SDXL refiner (LMD_REFINER): loaded once with the pipeline, applied
after the final pass unless the job says refine=false; a job that requires one fails clearly
on a worker without it."""

from __future__ import annotations

import pytest

from tests.support.builders import job_record
from tests.support.service import service_settings
from worker.runtime import Heartbeat, WorkerRuntime

LAYOUT = {"objects": [{"id": "cat", "phrase": "a red cat", "box": [0.1, 0.2, 0.5, 0.9]}], "background": "a park"}


def _runtime(private_redis, tmp_path, **settings) -> WorkerRuntime:
    return WorkerRuntime(service_settings(private_redis.url, tmp_path, device="cpu", torch_threads=1, **settings))


def _job(**fields):
    return job_record(layout=LAYOUT, steps=3, width=64, height=64, preset="fast", **fields)


def test_worker_loads_the_refiner_once_and_refines_unless_the_job_declines(private_redis, tmp_path, tiny_sd_path, tiny_refiner_path):
    runtime = _runtime(private_redis, tmp_path, sd_model=str(tiny_sd_path), refiner=str(tiny_refiner_path),
                       refiner_resolution=96, refiner_strength=0.1)
    pipeline = runtime.pipeline()
    refiner = runtime._refiner
    assert refiner is not None and runtime.pipeline() is pipeline and runtime._refiner is refiner
    heartbeat = Heartbeat(runtime.store, "j", runtime.worker, 60)
    refined = runtime._render(_job(), heartbeat)
    assert refined.image.size == (96, 96) and refined.report.refiner.steps == 5
    plain = runtime._render(_job(refine=False), heartbeat)
    assert plain.image.size == (64, 64) and plain.report.refiner is None


def test_a_job_that_requires_the_refiner_fails_on_a_worker_without_one(private_redis, tmp_path, tiny_sd_path):
    from grounded_sd import ModelLoadError

    runtime = _runtime(private_redis, tmp_path, sd_model=str(tiny_sd_path))
    with pytest.raises(ModelLoadError, match="LMD_REFINER is unset"):
        runtime._render(_job(refine=True), Heartbeat(runtime.store, "j", runtime.worker, 60))
