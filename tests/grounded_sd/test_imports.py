"""Stage 2 loads without the LLM client: the layout is the only contract with stage 1."""

from __future__ import annotations

from tests.support.blocked_imports import assert_runs_blocking, run_blocking


def test_the_hook_blocks_openai():
    result = run_blocking({"openai"}, "import layout_planner.client")
    assert result.returncode != 0 and "openai is blocked" in result.stderr


def test_grounded_sd_and_its_pipeline_import_without_openai():
    assert_runs_blocking({"openai"}, (
        "import grounded_sd\n"
        "from grounded_sd import LMDOptions, LMDPipeline\n"
        "import grounded_sd.pipeline, grounded_sd.per_box, grounded_sd.final_pass, grounded_sd.segment\n"
    ))


def test_the_shared_names_import_neither_torch_nor_openai():
    assert_runs_blocking({"openai", "torch", "diffusers"}, (
        "from grounded_sd.names import DTYPES, PRESETS, VARIANTS\n"
        "assert VARIANTS == ('lmd', 'sd', 'lmd_plus') and PRESETS == ('reference', 'fast')\n"
        "assert DTYPES == ('auto', 'float32', 'float16', 'bfloat16')\n"
    ))
