"""Progress bars that tell the truth: where a run ends, and no absurd rates at their start."""

from __future__ import annotations

import json
import os
import re

from lmd.cli import main


def test_plan_limit_ends_its_bar_at_what_it_plans(fake_llm, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("LMD_") or n == "OPENAI_API_KEY"]:
        monkeypatch.delenv(name)
    for name, value in fake_llm.env().items():
        monkeypatch.setenv(name, value)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"index": i, "prompt": f"{n} cats"}) + "\n" for i, n in enumerate(["two", "three", "four"])))
    out = tmp_path / "layouts.jsonl"
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out), "--limit", "2"]) == 0
    bars = re.findall(r"planning: +\d+%\|[^|]*\| (\d+)/(\d+)", capsys.readouterr().err)
    assert bars and bars[-1] == ("2", "2")
    assert main(["plan", "--prompts-file", str(prompts), "--out", str(out), "--limit", "2"]) == 0  # resumed: 1 left
    bars = re.findall(r"planning: +\d+%\|[^|]*\| (\d+)/(\d+)", capsys.readouterr().err)
    assert bars[0] == ("2", "3") and bars[-1] == ("3", "3")


def test_a_stage_bar_counts_no_rate_for_the_steps_done_before_it_started():
    from lmd.commands.generate import _StageBars

    bars = _StageBars(enabled=True)
    try:
        bars("per_box", 5, 50)  # the first report comes after five steps, a moment after the bar exists
        meter = bars.bar.format_dict
        assert meter["n"] - meter["initial"] == 0  # tqdm's rate is (n - initial) / elapsed: no 5 steps in 0 s
        bars("per_box", 7, 50)
        assert bars.bar.n == 7 and bars.bar.format_dict["initial"] == 5
    finally:
        bars.close()


def test_resumed_eval_prompts_do_not_count_in_the_rate():
    from lmd.commands.evaluate import _EvalProgress

    progress = _EvalProgress(total=300, method="lmd")
    try:
        for _ in range(200):
            progress.prompt_done(None, "skipped")
        progress.prompt_done(None, "generated")
        meter = progress.bar.format_dict
        assert meter["n"] == 201 and meter["n"] - meter["initial"] == 1  # one image generated in this run's time
    finally:
        progress.bar.close()
