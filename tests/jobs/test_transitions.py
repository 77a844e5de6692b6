"""The job state transitions on plain records, without Redis (jobs.transitions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs import transitions as t
from jobs.records import JobRecord, Progress
from tests.support.builders import job_record, layout

NOW = 1_000_000.0
LOST_AFTER_S = 60.0
LAYOUT = layout()


def _job(**fields) -> JobRecord:
    at = datetime.fromtimestamp(NOW, UTC)
    return job_record(created_at=at, updated_at=at, **fields)


def _held(state="rendering", worker="host-a:1", beat_age_s=1.0, **fields) -> JobRecord:
    return _job(state=state, worker=worker, heartbeat_at=NOW - beat_age_s, deliveries=1, **fields)


def _claim(job, stage="render", worker="host-b:2", max_deliveries=3, dead=()):
    return t.claim(job, stage, worker, NOW, max_deliveries, LOST_AFTER_S, worker_dead=lambda w: w in dead)


# --- claim ---------------------------------------------------------------------------------------
def test_a_queued_job_is_claimed_for_its_first_stage():
    outcome = _claim(_job(), stage="plan")
    assert outcome.claimed is outcome.stored
    assert (outcome.claimed.state, outcome.claimed.progress.stage) == ("planning", "planning")
    assert (outcome.claimed.worker, outcome.claimed.heartbeat_at, outcome.claimed.deliveries) == ("host-b:2", NOW, 1)


def test_a_job_with_a_given_layout_skips_planning():
    job = _job(layout=LAYOUT, layout_given=True)
    assert _claim(job, stage="plan") == t.Claim(None, None)
    taken = _claim(job, stage="render").claimed
    assert (taken.state, taken.progress.stage) == ("rendering", "starting")


def test_a_planned_job_is_not_planned_again():
    assert _claim(_job(state="rendering"), stage="plan") == t.Claim(None, None)


def test_a_live_holder_keeps_its_job():
    assert _claim(_held(beat_age_s=LOST_AFTER_S - 1)) == t.Claim(None, None)


def test_a_stale_or_dead_holder_loses_its_job():
    assert _claim(_held(beat_age_s=LOST_AFTER_S + 1)).claimed.worker == "host-b:2"
    taken = _claim(_held(beat_age_s=1.0), dead={"host-a:1"}).claimed
    assert (taken.worker, taken.deliveries) == ("host-b:2", 2)


def test_the_redelivery_bound_ends_the_job_worker_lost():
    job = _held(beat_age_s=LOST_AFTER_S + 1)
    outcome = _claim(job, max_deliveries=t.delivery_limit(0))
    assert outcome.claimed is None
    assert (outcome.stored.state, outcome.stored.error.code, outcome.stored.worker) == ("failed", "worker_lost", None)
    assert _claim(job, max_deliveries=t.delivery_limit(1)).claimed is not None


def test_a_cancel_requested_before_the_claim_ends_the_job():
    outcome = _claim(_job(cancel_requested=True), stage="plan")
    assert outcome.claimed is None and outcome.stored.state == "canceled"


@pytest.mark.parametrize("state", ["succeeded", "failed", "canceled"])
def test_a_finished_job_never_changes(state):
    job = _job(state=state)
    assert _claim(job, stage="plan") == t.Claim(None, None) == _claim(job, stage="render")
    assert t.request_cancel(job) is None
    assert t.fail(job, "timeout", "x") is None
    assert t.finish(job, None, "failed", "internal", "x") is None
    assert t.reap(job, NOW, LOST_AFTER_S, 3, 1.0) == t.Reaped(None, None)


# --- while held ------------------------------------------------------------------------------------
def test_only_the_holder_writes_a_running_job():
    job = _held()
    assert t.held_update(job, "host-b:2", {"heartbeat_at": NOW}) is None
    assert t.held_update(job, "host-a:1", {"heartbeat_at": NOW}).heartbeat_at == NOW
    assert t.finish(job, "host-b:2", "succeeded") is None


def test_planning_hands_the_job_unheld_to_the_render_stage():
    handed = t.planned(_held(state="planning"), "host-a:1", LAYOUT)
    assert (handed.state, handed.worker, handed.heartbeat_at, handed.deliveries) == ("rendering", None, None, 0)
    assert handed.layout == LAYOUT and handed.progress.stage == "waiting"
    assert t.ready_for(handed, "render") and not t.ready_for(handed, "plan")
    assert t.planned(_held(state="planning"), "host-b:2", LAYOUT) is None


def test_success_completes_the_progress_and_a_failure_carries_its_code():
    job = _held(progress=Progress(stage="final", step=3, total=10))
    done = t.finish(job, "host-a:1", "succeeded")
    assert (done.state, done.worker, done.error, done.progress.step) == ("succeeded", None, None, 10)
    failed = t.finish(job, "host-a:1", "failed", "out_of_memory", "smaller")
    assert (failed.state, failed.error.code, failed.error.message, failed.worker) == ("failed", "out_of_memory", "smaller", None)


def test_fail_ends_a_job_whoever_holds_it():
    assert t.fail(_held(), "timeout", "too long").error.code == "timeout"


# --- cancel ------------------------------------------------------------------------------------------
def test_cancel_ends_an_unheld_job_at_once_and_flags_a_held_one():
    assert t.request_cancel(_job()).state == "canceled"
    assert t.request_cancel(_job(state="rendering", layout=LAYOUT)).state == "canceled"  # planned, waiting
    flagged = t.request_cancel(_held())
    assert (flagged.state, flagged.cancel_requested, flagged.worker) == ("rendering", True, "host-a:1")


# --- the reaper ---------------------------------------------------------------------------------------
def _reap(job, max_deliveries=3, unheld_after_s=None, dead=()):
    return t.reap(job, NOW, LOST_AFTER_S, max_deliveries, unheld_after_s, worker_dead=lambda w: w in dead)


def test_the_reaper_leaves_a_live_job_alone_and_releases_a_stale_one():
    assert _reap(_held(beat_age_s=1.0)) == t.Reaped(None, None)
    released = _reap(_held(state="planning", beat_age_s=LOST_AFTER_S + 1))
    assert released.requeue == "plan"
    assert (released.stored.worker, released.stored.heartbeat_at, released.stored.progress.stage) == (None, None, "requeued")
    assert _reap(_held(beat_age_s=1.0), dead={"host-a:1"}).requeue == "render"


def test_the_reaper_fails_a_job_past_the_redelivery_bound():
    reaped = _reap(_held(beat_age_s=LOST_AFTER_S + 1), max_deliveries=1)
    assert reaped.requeue is None and reaped.stored.error.code == "worker_lost"


def test_an_unheld_job_is_sent_again_only_after_the_redelivery_period():
    fresh = _job()
    old = fresh.updated_at - timedelta(seconds=100)
    aged = fresh.model_copy(update={"updated_at": old})
    assert _reap(aged) == t.Reaped(None, None)  # without a period, never
    assert _reap(fresh, unheld_after_s=50) == t.Reaped(None, None)
    sent = _reap(aged, unheld_after_s=50)
    assert sent.requeue == "plan" and sent.stored.progress.stage == "requeued"
    assert _reap(aged.model_copy(update={"layout_given": True, "layout": LAYOUT}), unheld_after_s=50).requeue == "render"


# --- metrics -------------------------------------------------------------------------------------------
def test_counters_count_a_job_once_when_it_finishes():
    running = _held()
    failed = t.finish(running, "host-a:1", "failed", "timeout", "x")
    assert t.counters(running, failed) == ["finished:failed", "failed:timeout"]
    assert t.counters(running, t.finish(running, "host-a:1", "succeeded")) == ["finished:succeeded"]
    assert t.counters(failed, failed) == [] and t.counters(running, running) == []


def test_a_requested_cancel_wins_over_a_later_failure():
    """A job canceled while its LLM call hung, which then failed, ends canceled (it counted as a failure)."""
    from datetime import UTC, datetime

    from jobs import transitions
    from jobs.records import JobRecord

    now = datetime.now(UTC)
    held = JobRecord(job_id="j", session_id="s", prompt="a cat", seed=1, state="planning", worker="h:1",
                     heartbeat_at=0.0, created_at=now, updated_at=now)
    canceled = transitions.request_cancel(held)
    assert canceled.state == "planning" and canceled.cancel_requested
    ended = transitions.finish(canceled, "h:1", "failed", "llm_unavailable", "the LLM could not be reached")
    assert (ended.state, ended.error.code) == ("canceled", "canceled")
    assert transitions.counters(canceled, ended) == ["finished:canceled"]
    killed = transitions.fail(canceled, "timeout", "hard limit")
    assert (killed.state, killed.error.code) == ("canceled", "canceled")
    plain = transitions.finish(held, "h:1", "failed", "llm_unavailable", "the LLM could not be reached")
    assert (plain.state, plain.error.code) == ("failed", "llm_unavailable")


# --- a requested cancel wins everywhere (issue 19, defect 9) ----------------------------------------
def test_the_reaper_ends_a_lost_job_whose_cancel_was_requested_instead_of_requeuing_it():
    flagged = t.request_cancel(_held(beat_age_s=LOST_AFTER_S + 1))
    reaped = _reap(flagged)
    assert reaped.requeue is None
    assert (reaped.stored.state, reaped.stored.error.code, reaped.stored.worker) == ("canceled", "canceled", None)
    assert _reap(t.request_cancel(_held(beat_age_s=1.0)), dead={"host-a:1"}).stored.state == "canceled"
    assert _reap(t.request_cancel(_held(beat_age_s=1.0))) == t.Reaped(None, None)  # its live worker stops it


def test_an_unheld_job_whose_cancel_was_requested_is_canceled_not_sent_again():
    flagged = t.planned(t.request_cancel(_held(state="planning")), "host-a:1", LAYOUT)
    assert (flagged.state, flagged.error.code) == ("canceled", "canceled")  # the hand-over checks the flag too
    unheld = _job(state="rendering", layout=LAYOUT, cancel_requested=True)
    reaped = _reap(unheld, unheld_after_s=None)
    assert reaped.requeue is None and reaped.stored.state == "canceled"
