"""Stage 2's options of a job as the render worker builds them (preset, steps, guidance, LMD_MAX_BATCH)."""

from __future__ import annotations

from tests.support.builders import job_record, plain_settings
from worker.runtime import describe_failure, render_options


def test_reference_preset_with_the_requests_steps_and_guidance():
    options = render_options(job_record(steps=7, guidance_scale=3.0), plain_settings())
    assert (options.steps, options.guidance_scale, options.max_batch, options.per_box_full_pass) == (7, 3.0, None, True)


def test_fast_preset_and_the_workers_max_batch():
    from grounded_sd import LMDOptions

    options = render_options(job_record(preset="fast", steps=20), plain_settings(max_batch=2))
    assert options == LMDOptions.fast(steps=20, max_batch=2)
    assert options != LMDOptions.reference(steps=20, max_batch=2)


def _raised_by(action) -> Exception:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the test wants whatever torch raises
        return exc
    raise AssertionError("expected an exception")


def test_a_failed_cpu_allocation_is_out_of_memory_not_internal():
    import torch

    exc = _raised_by(lambda: torch.empty(2**50, dtype=torch.uint8))  # a real allocator failure, 1 PiB
    code, message = describe_failure(exc, "render")
    assert code == "out_of_memory" and "host memory" in message


def test_other_runtime_errors_stay_internal():
    import torch

    exc = _raised_by(lambda: torch.ones(2) @ torch.ones(3))
    assert describe_failure(exc, "render")[0] == "internal"


def test_a_cuda_out_of_memory_is_out_of_memory():
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (a real allocation past its memory)")
    total = torch.cuda.get_device_properties(0).total_memory
    exc = _raised_by(lambda: torch.empty(2 * total, dtype=torch.uint8, device="cuda"))
    assert isinstance(exc, torch.OutOfMemoryError)
    assert describe_failure(exc, "render")[0] == "out_of_memory"
