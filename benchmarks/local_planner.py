"""Layout accuracy and seconds per layout of a local planner model on the LMD benchmark prompts.

    .venv/bin/python -m benchmarks.local_planner --model Qwen/Qwen2.5-1.5B-Instruct [--limit 400] \
        [--device auto] [--dtype auto] [--out benchmarks/runs/qwen2.5-1.5b]

Plans every prompt of ``benchmarks/data/prompts.jsonl`` (or ``--limit`` of them, the four
tasks in turn) with the local planner (the model is downloaded on first use), writes the
layouts as ``lmd plan --prompts-file`` does, scores them with ``lmd eval-layouts``, and
writes ``result.json``: model, device, load time, seconds and tokens per layout, failures,
and the accuracy per task (published rules and after repair). Temperature, re-asks and
limits come from the settings (``LMD_LLM_TEMPERATURE``, ``LMD_LLM_MAX_REASKS``,
``LMD_LOCAL_LLM_*``); the first layout's time excludes the model load, reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from itertools import zip_longest
from pathlib import Path

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


def balanced(rows: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` prompts taking the tasks in turn (all of them without a limit)."""
    if limit is None or limit >= len(rows):
        return rows
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row.get("task", ""), []).append(row)
    mixed = [row for group in zip_longest(*by_task.values()) for row in group if row is not None]
    return sorted(mixed[:limit], key=lambda row: row["index"])


def run(args: argparse.Namespace) -> dict:
    from layout_planner import PlannerError
    from lmd.cli import main as lmd_main
    from lmd.wiring import local_llm_config
    from lmd.settings import Settings

    settings = Settings()
    updates = {"model": args.model or settings.local_llm_model}
    updates.update({k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v})
    config = local_llm_config(settings).model_copy(update=updates)

    from layout_planner import Planner

    rows = balanced([json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()], args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    planner = Planner(config, on_retry=lambda line: print(line, file=sys.stderr))
    started = time.perf_counter()
    planner.client.load()
    load_s = time.perf_counter() - started
    tokenizer, model, device = planner.client._loaded[:3]
    seconds, tokens, failed, seen = [], [], 0, {}
    with (out / "layouts.jsonl").open("w") as handle:
        for number, row in enumerate(rows, 1):
            sample = seen.get(row["prompt"], 0)
            seen[row["prompt"]] = sample + 1
            line = {"index": row["index"], "task": row["task"], "prompt": row["prompt"], "sample_index": sample}
            started = time.perf_counter()
            try:
                layout, report = planner.plan_with_report(row["prompt"], sample_index=sample)
                line["layout"] = layout.model_dump(mode="json")
                tokens.append(report.tokens)
            except PlannerError as exc:
                failed += 1
                line.update(error=str(exc), error_type=type(exc).__name__)
            seconds.append(time.perf_counter() - started)
            handle.write(json.dumps(line) + "\n")
            print(f"[{number}/{len(rows)}] {seconds[-1]:.2f} s  {row['prompt']}", file=sys.stderr)

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        lmd_main(["eval-layouts", "--layouts", str(out / "layouts.jsonl"), "--prompts", str(out / "prompts.jsonl"), "--json"])
    scores = json.loads(captured.getvalue())
    result = {
        "model": config.model,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "temperature": config.temperature,
        "prompts": len(rows),
        "failed": failed,
        "load_s": round(load_s, 2),
        "seconds_per_layout": {
            "mean": round(statistics.fmean(seconds), 3),
            "median": round(statistics.median(seconds), 3),
            "max": round(max(seconds), 3),
        },
        "tokens_per_layout": round(statistics.fmean(tokens), 1) if tokens else None,
        "accuracy": {task: row["accuracy"] for task, row in scores["published"].items()},
        "accuracy_after_repair": {task: row["accuracy"] for task, row in scores["after_repair"].items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or local directory (default LMD_LOCAL_LLM_MODEL)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (default LMD_LOCAL_LLM_DEVICE)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), help="default LMD_LOCAL_LLM_DTYPE")
    parser.add_argument("--limit", type=int, help="plan this many prompts, the four tasks in turn (default: all 400)")
    parser.add_argument("--out", default="benchmarks/runs/local_planner", help="directory for prompts, layouts and result.json")
    result = run(parser.parse_args(argv))
    print(json.dumps(result, indent=2))
    acc = result["accuracy"]
    print(
        f"| {result['model']} | {result['device']} {result['dtype']} | {result['prompts']} | {acc['overall']} | "
        + " | ".join(str(acc.get(t, "-")) for t in ("negation", "numeracy", "attribution", "spatial"))
        + f" | {result['seconds_per_layout']['mean']} | {result['load_s']} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
