"""What a worker process does with a job, and what it keeps between jobs.

Knows nothing of Celery's messages: ``worker.tasks`` calls :meth:`WorkerRuntime.run_plan`
and :meth:`WorkerRuntime.run_render` with a job id. One :class:`WorkerRuntime` per process
(:func:`current`), created in the process that runs the tasks, so the pipeline is loaded
once per render process, after the fork, and no CUDA state ever crosses a fork.

A running job carries its worker's ``hostname:pid`` and a heartbeat refreshed by a thread;
:class:`Maintenance` (in every worker's main process) releases jobs whose heartbeat went
stale and re-enqueues them, up to ``LMD_MAX_REDELIVERIES``, then fails them ``worker_lost``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable

import redis
from celery.exceptions import SoftTimeLimitExceeded

from jobs.files import drop_old_job_dirs, job_dir, result_file
from jobs.queue import is_render_queue, redelivery_after_s
from jobs.records import ErrorCode, JobRecord, PreviewInfo, Progress
from jobs.store import Store, this_worker
from jobs.transitions import delivery_limit
from layout_planner.layout import MAX_OBJECTS
from lmd import wiring
from lmd.capabilities import render_capabilities
from lmd.settings import Settings

log = logging.getLogger(__name__)


class RedisLayoutCache:
    """Stage 1's LLM answer cache (``layout_planner.LayoutCache``) in Redis, kept for the retention period."""

    def __init__(self, client: redis.Redis, ttl_s: int, prefix: str = "lmd:llm:"):
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix

    def get(self, key: str) -> str | None:
        try:
            return self.client.get(self.prefix + key)
        except redis.RedisError as exc:  # a cache miss, not a failed job
            log.warning("LLM cache read failed: %s", exc)
            return None

    def set(self, key: str, value: str) -> None:
        try:
            self.client.set(self.prefix + key, value, ex=self.ttl_s)
        except redis.RedisError as exc:
            log.warning("LLM cache write failed: %s", exc)


class Heartbeat:
    """Refreshes the job's heartbeat while the work runs; notices when the job is no longer ours."""

    def __init__(self, store: Store, job_id: str, worker: str, interval_s: float):
        self.store, self.job_id, self.worker, self.interval_s = store, job_id, worker, interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def beat(self) -> None:
        try:
            if self.store.held_update(self.job_id, self.worker, {"heartbeat_at": time.time()}) is None:
                self.lost = True
        except redis.RedisError as exc:
            log.warning("heartbeat of job %s failed: %s", self.job_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()


class WorkerRuntime:
    """A worker process's settings, store, planner and pipeline (the last two built on first use,
    the pipeline possibly ahead of time by ``preload_pipeline``)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.worker = this_worker()
        self._planner = None
        self._pipeline = None
        self._refiner = None
        self._pipeline_lock = threading.Lock()
        self._conditionings = None

    @property
    def model_name(self) -> str | None:
        """The LMD_MODELS name this worker serves (None without LMD_MODELS)."""
        if not self.settings.models:
            return None
        return self.settings.worker_model or next(iter(self.settings.models))

    @property
    def max_deliveries(self) -> int:
        return delivery_limit(self.settings.max_redeliveries)

    # --- the parts, loaded once per process --------------------------------------------------
    def planner(self):
        """The planner, built on the first plan job; a local model loads (or downloads) then, once per process."""
        if self._planner is None:
            cache = RedisLayoutCache(self.store.redis, self.settings.retention_s)
            log.info("planner: %s (pid %d)", wiring.choose_planner(self.settings).describe(), os.getpid())
            self._planner = wiring.ready_planner(self.settings, say=log.info, cache=cache,
                                                 max_objects=min(self.settings.max_objects, MAX_OBJECTS))
        return self._planner

    def preload_pipeline(self) -> None:
        """Load the pipeline now, in a render pool child's background thread, so that the first job
        does not pay for it; a failure is only logged (the job that needs the model reports it)."""
        try:
            self.pipeline()
        except Exception as exc:  # noqa: BLE001 - reported again, typed, by the first render
            log.warning("preloading the pipeline failed (pid %d): %s", os.getpid(), exc)

    def pipeline(self):
        with self._pipeline_lock:  # a render waits here while the preload thread is still loading
            return self._load_pipeline()

    def _load_pipeline(self):
        if self._pipeline is None:
            s = self.settings
            log.info("loading %s on device=%s dtype=%s (pid %d)", wiring.default_model(s), s.device, s.dtype, os.getpid())
            started = time.monotonic()
            pipeline = wiring.load_pipeline(s, cpu_threads=1)  # one thread per render process on a CPU host
            self._refiner = wiring.load_refiner(s)  # None without LMD_REFINER; loaded once, like the pipeline
            log.info("pipeline%s loaded in %.1f s (pid %d)", " and refiner" if self._refiner else "",
                     time.monotonic() - started, os.getpid())
            self._pipeline = pipeline
        return self._pipeline

    def conditioning(self, name: str):
        """The conditioning ``name``, loaded beside the pipeline the first time a job asks for it
        (ELLA's T5-XL ~2.5 GB, GlueNet's XLM-R ~1.1 GB in fp16; docs/conditioning.md), then kept."""
        pipe = self.pipeline()
        with self._pipeline_lock:
            if self._conditionings is None:
                self._conditionings = wiring.conditionings(self.settings, pipe)
            if name not in self._conditionings.loaded:
                log.info("loading conditioning %s (pid %d)", name, os.getpid())
            return self._conditionings.get(name)

    # --- stage 1 -----------------------------------------------------------------------------------
    def run_plan(self, job_id: str) -> str:
        """Plan (or revise) the job's layout; hand the job to the render queue. Returns what happened."""
        job = self.store.claim(job_id, "plan", self.worker, self.max_deliveries, self.settings.worker_lost_after_s)
        if job is None:
            return "skipped"
        with Heartbeat(self.store, job_id, self.worker, self.settings.heartbeat_s) as heartbeat:
            try:  # a cancel (or the job being reaped) stops the planner between LLM requests
                layout = self._plan(job, should_cancel=lambda: heartbeat.lost or self._cancel_requested(job_id))
            except Exception as exc:  # every failure ends the job with a code; nothing escapes to Celery
                if heartbeat.lost:
                    return "lost"
                return self._fail(job_id, exc, stage="plan")
            if layout is None:
                return self._end(job_id, "failed", "no_layout", "the session has no succeeded turn to revise; "
                                 "generate first, then instruct")
            if heartbeat.lost:
                return "lost"
            if self._cancel_requested(job_id):
                return self._end(job_id, "canceled", "canceled", "canceled after planning, before rendering")
            handed = self.store.hand_to_render(job_id, self.worker, layout)
        if handed is None:
            return "lost"
        return "canceled" if handed.state == "canceled" else "planned"

    def _plan(self, job: JobRecord, should_cancel):
        """The job's layout; ``should_cancel`` is checked between asks and, for a local model, between tokens."""
        from layout_planner import Turn

        planner = self.planner()
        if job.kind in ("generate", "plan"):
            return planner.plan(job.prompt, should_cancel=should_cancel)
        history = [Turn(text=text, layout=layout) for text, layout in self.store.conversation(job.session_id, job.turn)]
        if not history:
            return None
        return planner.revise(history, job.prompt, should_cancel=should_cancel)

    # --- stage 2 -----------------------------------------------------------------------------------
    def run_render(self, job_id: str) -> str:
        """Render the job's layout, write image, overlay, masks and report, end the job. Returns what happened."""
        job = self.store.claim(job_id, "render", self.worker, self.max_deliveries, self.settings.worker_lost_after_s)
        if job is None:
            return "skipped"
        with Heartbeat(self.store, job_id, self.worker, self.settings.heartbeat_s) as heartbeat:
            started = time.monotonic()
            try:
                result = self._render(job, heartbeat)
                out = job_dir(self.settings.data_dir, job_id)
                if out.exists():
                    shutil.rmtree(out)  # what an earlier, killed delivery left
                result.save(out, result.parameters(prompt=job.prompt, preset=job.preset,
                                                   negative_prompt=job.negative_prompt))
            except Exception as exc:
                if heartbeat.lost:
                    return "lost"
                return self._fail(job_id, exc, stage="render")
            ended = self.store.finish(job_id, self.worker, "succeeded")
        if ended is None or ended.state != "succeeded":
            return "lost"
        try:
            self.store.record_render(time.monotonic() - started)
        except redis.RedisError as exc:
            log.warning("render time of job %s not recorded: %s", job_id, exc)
        return "succeeded"

    def _render(self, job: JobRecord, heartbeat: Heartbeat):
        current = {"progress": Progress(stage="starting")}  # what was last written: a preview keeps the step

        def write_progress(update: Progress) -> None:
            current["progress"] = update
            try:
                self.store.held_update(job.job_id, self.worker, {"progress": update, "heartbeat_at": time.time()})
            except redis.RedisError as exc:
                log.warning("progress of job %s not recorded: %s", job.job_id, exc)

        if self._pipeline is None:  # said only when true: a loaded model starts at once
            write_progress(Progress(stage="loading"))
        pipe = self.pipeline()
        options = render_options(job, self.settings)
        conditioning = self.conditioning(job.conditioning)

        def progress(stage: str, step: int, total: int) -> None:
            write_progress(Progress(stage=stage, step=step, total=total, preview=current["progress"].preview))

        def preview(stage: str, step: int, total: int, image) -> None:
            """Write the preview (replacing the last one whole, so the API never serves half a file)."""
            path = result_file(self.settings.data_dir, job.job_id, "preview")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".partial")
                image.save(partial, format="PNG", compress_level=1)  # speed over size: written every few steps
                os.replace(partial, path)
            except OSError as exc:  # a preview is a nicety: never a failed job
                log.warning("preview of job %s not written: %s", job.job_id, exc)
                return
            last = current["progress"]
            count = last.preview.count + 1 if last.preview else 1
            write_progress(last.model_copy(update={"preview": PreviewInfo(count=count, stage=stage, step=step, total=total)}))

        def should_cancel() -> bool:
            return heartbeat.lost or self._cancel_requested(job.job_id)

        loras = wiring.lora_choices(self.settings, [(lora.name, lora.weight) for lora in job.loras])
        if job.model is not None and job.model != self.model_name:
            from grounded_sd import ModelLoadError

            raise ModelLoadError(f"the job asks for model {job.model!r}; this worker serves {self.model_name!r}")
        if job.refine and self._refiner is None:
            from grounded_sd import ModelLoadError

            raise ModelLoadError("the job asks for the SDXL refiner, but this worker has none (LMD_REFINER is unset)")
        result = pipe(
            job.layout,
            seed=job.seed,
            options=options,
            variant=job.variant,
            width=job.width,
            height=job.height,
            negative_prompt=job.negative_prompt,
            progress=progress,
            should_cancel=should_cancel,
            conditioning=conditioning,
            source_prompt=job.source_prompt,
            language=job.language,
            preview=preview if job.previews else None,
            loras=loras,
        )
        if self._refiner is not None and job.refine is not False:  # the refiner pass, after the final pass
            result = self._refiner.refine(
                result, options=wiring.refiner_options(self.settings), progress=progress, should_cancel=should_cancel
            )
        return result

    # --- endings -----------------------------------------------------------------------------------
    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.cancel_requested(job_id)
        except redis.RedisError:
            return False

    def _end(self, job_id: str, state: str, code: ErrorCode, message: str) -> str:
        ended = self.store.finish(job_id, self.worker, state, code, message)
        return state if ended is not None and ended.state == state else "lost"

    def _fail(self, job_id: str, exc: Exception, stage: str) -> str:
        code, message = describe_failure(exc, stage)
        if code == "canceled":
            return self._end(job_id, "canceled", code, message)
        if code == "internal":
            log.error("job %s failed in %s", job_id, stage, exc_info=exc)
        else:  # the client's message is plain; the cause, with its internals, is here
            log.warning("job %s failed in %s: %s: %s: %s", job_id, stage, code, type(exc).__name__, exc)
        return self._end(job_id, "failed", code, message)


def render_options(job: JobRecord, settings: Settings):
    """Stage 2's options for a job: its preset, its steps and guidance, and the worker's LMD_MAX_BATCH."""
    return wiring.render_options(settings, job.preset, steps=job.steps, guidance_scale=job.guidance_scale)


# What torch's CPU allocator raises (a plain RuntimeError, not torch.OutOfMemoryError) when malloc fails.
CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


def describe_failure(exc: Exception, stage: str) -> tuple[ErrorCode, str]:
    """A typed failure's code and a plain message a client can act on (docs/service.md "Job lifecycle").

    The message never carries the exception's own text where that names internals (the LLM
    endpoint's URL and model, a model path, a traceback): clients get the code and a plain
    sentence, and ``WorkerRuntime._fail`` writes the exception to the worker's log.
    """
    from layout_planner import InvalidPrompt, LLMBadOutput, LLMUnavailable, PlannerError
    from layout_planner.errors import LocalModelUnavailable, PlanCanceled

    if isinstance(exc, InvalidPrompt):
        return "invalid_prompt", str(exc)
    if isinstance(exc, PlanCanceled):
        return "canceled", f"canceled while planning, after {exc.tokens} generated tokens"
    if isinstance(exc, LocalModelUnavailable):
        return "llm_unavailable", "the plan worker cannot load its layout model (details are in the service's log)"
    if isinstance(exc, LLMUnavailable):
        return "llm_unavailable", "the layout planner's LLM could not be reached; retry later (details are in the service's log)"
    if isinstance(exc, LLMBadOutput | PlannerError):
        return "llm_bad_output", "the layout planner's LLM never answered with a usable layout; rephrase the prompt"
    if isinstance(exc, SoftTimeLimitExceeded):
        return "timeout", f"the {stage} stage ran past LMD_TASK_SOFT_TIME_LIMIT_S; use fewer steps or a smaller size"
    if stage == "render":
        from grounded_sd import GenerationCanceled, InvalidRequest, ModelLoadError, VariantUnavailable
        from grounded_sd.errors import ConditioningUnavailable
        from grounded_sd.lora import LoraLoadError

        if isinstance(exc, GenerationCanceled):
            return "canceled", "canceled while rendering"
        if isinstance(exc, InvalidRequest):  # the API checks variant and size first: in practice the layout
            return "invalid_layout", str(exc)
        if isinstance(exc, VariantUnavailable):
            return "variant_unavailable", str(exc)
        if isinstance(exc, ConditioningUnavailable):  # its own text may hold a path or a hub client's message
            return "model_unavailable", exc.public or ("the render worker cannot load the requested conditioning "
                                                       "(its files or settings); the operator must fix them "
                                                       "(details are in the service's log)")
        if isinstance(exc, LoraLoadError):  # its text names the file
            return "model_unavailable", (f"the render worker cannot load the LoRA adapter {exc.name!r} (its file, or its fit "
                                         "to this model); the operator must fix LMD_LORAS (details are in the service's log)")
        if isinstance(exc, ModelLoadError):
            return "model_unavailable", "the render worker cannot load its model; the operator must fix its settings"
        if isinstance(exc, wiring.UnknownName):  # the API accepted a name this worker's settings lack
            return "model_unavailable", f"{exc}; the render worker's settings differ from the API's"
        import torch

        if isinstance(exc, torch.OutOfMemoryError):  # the CUDA caching allocator's (torch.cuda.OutOfMemoryError)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return "out_of_memory", ("the GPU ran out of memory; try a smaller width/height or fewer objects "
                                     "(or set LMD_DTYPE=float16)")
        if isinstance(exc, RuntimeError) and CPU_ALLOCATION_FAILED in str(exc):
            return "out_of_memory", ("the render worker ran out of host memory; try a smaller width/height, "
                                     "fewer objects, or LMD_MAX_BATCH")
    return "internal", f"an unexpected error stopped the {stage} stage (details are in the service's log)"


_runtimes: dict[int, WorkerRuntime] = {}


def current() -> WorkerRuntime:
    """This process's runtime, created on first use in this process (never inherited across a fork)."""
    pid = os.getpid()
    if pid not in _runtimes:
        _runtimes.clear()
        _runtimes[pid] = WorkerRuntime(wiring.load_settings(cached=True))
    return _runtimes[pid]


class Maintenance:
    """A thread in each worker's main process: registers the worker, re-enqueues lost jobs, drops old images.

    ``requeue(job_id, stage)`` sends the job's task again (the Celery app's ``enqueue``).
    """

    def __init__(self, settings: Settings, name: str, queues: list[str], requeue: Callable[[str, str], None]):
        self.settings, self.name, self.queues, self.requeue = settings, name, queues, requeue
        self.store = Store.from_settings(settings)
        # Told from files once at start (no weights loaded): what GET /limits offers to clients.
        self.capabilities = render_capabilities(settings).model_dump() if any(map(is_render_queue, queues)) else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmd-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """On a warm shutdown: stop sweeping and leave /readyz at once (not when the entry expires)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.unregister_worker(self.name)
        except redis.RedisError as exc:
            log.warning("could not unregister worker %s: %s", self.name, exc)

    def model_of(self, job_id: str) -> str | None:
        """The LMD_MODELS name of a job (its render queue); None for a job gone or without one."""
        job = self.store.get_job(job_id)
        return job.model if job is not None else None

    def sweep(self) -> list[tuple[str, str]]:
        """One pass of the reaper; returns the jobs it re-enqueued."""
        lost = self.store.reap_lost(self.settings.worker_lost_after_s, delivery_limit(self.settings.max_redeliveries),
                                    unheld_after_s=redelivery_after_s(self.settings))
        for job_id, stage in lost:
            log.warning("job %s lost its worker or its message (%s); re-enqueued", job_id, stage)
            self.requeue(job_id, stage)
        return lost

    def drop_old_results(self) -> int:
        return drop_old_job_dirs(self.settings.data_dir, self.settings.retention_s)

    def _run(self) -> None:
        next_sweep = 0.0
        while True:
            try:
                self.store.register_worker(self.name, self.queues, ttl_s=max(3 * self.settings.heartbeat_s, 10.0),
                                           capabilities=self.capabilities)
                if self.settings.worker_alive_file is not None:  # only after Redis took the registration
                    self.settings.worker_alive_file.touch()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.reaper_interval_s
                    self.sweep()
                    self.drop_old_results()
            except Exception as exc:  # Redis down, broker down: try again next beat
                log.warning("maintenance pass failed: %s", exc)
            if self._stop.wait(self.settings.heartbeat_s):
                return
