"""Stage 2's options of a job as the render worker builds them (preset, steps, guidance, LMD_MAX_BATCH)."""

from __future__ import annotations

from api.store import JobRecord, utcnow
from lmd.settings import Settings
from worker.runtime import render_options


def _job(**fields) -> JobRecord:
    now = utcnow()
    return JobRecord(job_id="j", session_id="s", prompt="a cat", seed=1, created_at=now, updated_at=now, **fields)


def test_reference_preset_with_the_requests_steps_and_guidance():
    options = render_options(_job(steps=7, guidance_scale=3.0), Settings(_env_file=None))
    assert (options.steps, options.guidance_scale, options.max_batch, options.per_box_full_pass) == (7, 3.0, None, True)


def test_fast_preset_and_the_workers_max_batch():
    options = render_options(_job(preset="fast"), Settings(_env_file=None, max_batch=2))
    assert (options.steps, options.max_batch, options.per_box_full_pass, options.guidance_steps) == (50, 2, False, 15)
