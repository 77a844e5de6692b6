"""``lmd plan`` (prompt -> layout, one or a batch) and ``lmd eval-layouts`` (the LMD benchmark, layout level).

Stage 1 only: nothing here imports torch. LLM settings come from ``lmd.settings.Settings``
(``LMD_LLM_*``, ``OPENAI_API_KEY``); planner errors become one-line CLI errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmd.cli import CLIError

# The benchmark data ships with the repository, not the package: resolve it from the repo root.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = REPO_ROOT / "benchmarks" / "data" / "prompts.jsonl"


def llm_config_from_settings(settings):
    """The planner's ``LLMConfig`` from the service-wide ``Settings`` (the stages never read settings)."""
    from layout_planner import LLMConfig

    return LLMConfig(
        base_url=settings.llm_base_url,
        model=settings.llm_model,
        api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
        mode=settings.llm_mode,
        structured_output=settings.llm_structured_output,
        temperature=settings.llm_temperature,
        max_tokens=settings.llm_max_tokens,
        timeout_s=settings.llm_timeout_s,
        max_attempts=settings.llm_max_attempts,
        max_reasks=settings.llm_max_reasks,
        backoff_s=settings.llm_backoff_s,
        max_retry_after_s=settings.llm_max_retry_after_s,
        max_prompt_chars=settings.max_prompt_chars,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="turn a prompt into a layout with the LLM (prints JSON)",
        description="Ask the configured LLM (LMD_LLM_* settings) for a layout and print it as JSON.",
    )
    plan.add_argument("prompt", nargs="?", help="the image prompt (omit with --prompts-file)")
    plan.add_argument("--draw", type=Path, metavar="PNG", help="also draw the layout to this PNG")
    plan.add_argument("--sample-index", type=int, default=0, help="which sample of this prompt (cache key; default 0)")
    plan.add_argument("--revise", type=Path, metavar="LAYOUT_JSON", help="a layout printed by lmd plan for PROMPT, to edit")
    plan.add_argument("--instruction", help="with --revise: the edit to make (\"move the cat to the left\")")
    plan.add_argument("--prompts-file", type=Path, metavar="JSONL", help="batch mode: one {\"prompt\": ..., \"index\": ...} per line")
    plan.add_argument("--out", type=Path, metavar="JSONL", help="batch mode: output file, appended to and resumed")
    plan.add_argument("--limit", type=int, help="batch mode: plan at most this many pending prompts")
    plan.set_defaults(handler=run_plan)

    evaluate = subparsers.add_parser(
        "eval-layouts",
        help="score layouts on the LMD benchmark (published layout-level rules)",
        description="Score layouts per task and overall with the published LMD rules, plus stricter checks.",
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--layouts", type=Path, metavar="JSONL", help="layouts written by lmd plan --prompts-file")
    source.add_argument("--responses", type=Path, metavar="JSON", help="raw LLM answers {prompt: [answer, ...]} to replay")
    evaluate.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="benchmark prompts JSONL (default: the LMD benchmark)")
    evaluate.add_argument("--max-iou", type=float, default=0.5, help="strict check: no pair of boxes above this IoU (default 0.5)")
    evaluate.add_argument("--min-box-px", type=int, default=32, help="strict check: every box side at least this on the 512 grid (default 32)")
    evaluate.add_argument("--json", action="store_true", help="print machine-readable JSON")
    evaluate.add_argument("--show-failures", action="store_true", help="list every failed prompt with the reason")
    evaluate.set_defaults(handler=run_eval_layouts)


# ----------------------------------------------------------------------------------------
# lmd plan
# ----------------------------------------------------------------------------------------


def _planner():
    from layout_planner import Planner
    from lmd.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        raise CLIError(f"invalid settings: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
    return Planner(llm_config_from_settings(settings))


def run_plan(args: argparse.Namespace) -> int:
    from layout_planner import Layout, PlannerError, Turn

    if args.prompts_file or args.out:
        if not (args.prompts_file and args.out):
            raise CLIError("batch mode needs both --prompts-file and --out")
        if args.prompt or args.revise or args.draw:
            raise CLIError("--prompts-file does not combine with a PROMPT, --revise or --draw")
        return _run_batch(args)
    if not args.prompt:
        raise CLIError("give a PROMPT, or --prompts-file with --out")
    if bool(args.revise) != bool(args.instruction):
        raise CLIError("--revise and --instruction go together")
    planner = _planner()
    try:
        if args.revise:
            try:
                previous = Layout.model_validate_json(args.revise.read_text(encoding="utf-8"))
            except OSError as exc:
                raise CLIError(f"cannot read {args.revise}: {exc.strerror}") from None
            except ValidationError as exc:
                raise CLIError(f"{args.revise} is not a layout: {exc.errors()[0]['msg']}") from None
            layout = planner.revise([Turn(text=args.prompt, layout=previous)], args.instruction)
        else:
            layout = planner.plan(args.prompt, sample_index=args.sample_index)
    except PlannerError as exc:
        raise CLIError(str(exc)) from None
    finally:
        planner.close()
    print(layout.model_dump_json(indent=2))
    if args.draw:
        from layout_planner.draw import draw_layout

        try:
            draw_layout(layout).save(args.draw)
        except OSError as exc:
            raise CLIError(f"cannot write {args.draw}: {exc}") from None
        print(f"drew {len(layout.objects)} boxes to {args.draw}", file=sys.stderr)
    return 0


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise CLIError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    return rows


def _batch_items(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Prompts with a resume key (their index, else prompt text + occurrence) and a sample index."""
    items, seen = [], Counter()
    for number, row in enumerate(rows, 1):
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise CLIError(f"{path}: prompt line {number} has no \"prompt\" string")
        sample = seen[prompt]
        seen[prompt] += 1
        key = f"index:{row['index']}" if "index" in row else f"prompt:{prompt}#{sample}"
        items.append({"key": key, "row": row, "sample_index": sample})
    return items


def _line_key(line: dict[str, Any]) -> str:
    return f"index:{line['index']}" if "index" in line else f"prompt:{line.get('prompt')}#{line.get('sample_index', 0)}"


def _run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from layout_planner import PlannerError

    items = _batch_items(_read_jsonl(args.prompts_file, "prompts file"), args.prompts_file)
    done = {_line_key(line) for line in (_read_jsonl(args.out, "output") if args.out.exists() else []) if "layout" in line}
    pending = [item for item in items if item["key"] not in done]
    already = len(items) - len(pending)
    if args.limit is not None:
        pending = pending[: args.limit]
    planner = _planner()
    failed = 0
    try:
        with args.out.open("a", encoding="utf-8") as out, tqdm(
            total=len(items), initial=already,
            desc="planning", unit="prompt", file=sys.stderr,
        ) as bar:  # fmt: skip
            for item in pending:
                row = item["row"]
                line: dict[str, Any] = {k: row[k] for k in ("index", "task") if k in row}
                line.update(prompt=row["prompt"], sample_index=item["sample_index"])
                try:
                    layout = planner.plan(row["prompt"], sample_index=item["sample_index"])
                    line["layout"] = layout.model_dump(mode="json")
                except PlannerError as exc:
                    failed += 1
                    line.update(error=str(exc), error_type=type(exc).__name__)
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(1)
                bar.set_postfix(failed=failed)
    finally:
        planner.close()
    print(
        f"planned {len(pending) - failed}, failed {failed}, already done {already} -> {args.out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------
# lmd eval-layouts
# ----------------------------------------------------------------------------------------


def _load_prompts(path: Path) -> list[dict[str, Any]]:
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    rows = _read_jsonl(path, "prompts")
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str):
            raise CLIError(f"{path}: line {number} has no \"prompt\" string")
    return rows


def _tally(results: list[tuple[str, bool]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for task in sorted({t for t, _ in results}, key=lambda t: (t not in _TASK_ORDER, _TASK_ORDER.get(t, 0), t)):
        passed = sum(ok for t, ok in results if t == task)
        total = sum(1 for t, _ in results if t == task)
        table[task] = {"passed": passed, "total": total, "accuracy": round(100 * passed / total, 1)}
    passed, total = sum(ok for _, ok in results), len(results)
    table["overall"] = {"passed": passed, "total": total, "accuracy": round(100 * passed / total, 1) if total else 0.0}
    return table


_TASK_ORDER = {"negation": 0, "numeracy": 1, "attribution": 2, "spatial": 3}


def run_eval_layouts(args: argparse.Namespace) -> int:
    from layout_planner import Layout, LayoutParseError
    from layout_planner.benchmark import (
        BenchmarkPromptError,
        answer_detections,
        evaluate,
        layout_detections,
        parse_benchmark_prompt,
        strict_checks,
    )
    from layout_planner.parse import build_layout, parse_answer

    prompts = _load_prompts(args.prompts)
    published: list[tuple[str, bool]] = []
    repaired: list[tuple[str, bool]] = []
    strict: Counter = Counter()
    failures: list[dict[str, Any]] = []
    errors = missing = 0

    if args.responses:
        try:
            responses = json.loads(args.responses.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CLIError(f"cannot read {args.responses}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise CLIError(f"{args.responses} is not JSON ({exc.msg})") from None
        if not isinstance(responses, dict):
            raise CLIError(f"{args.responses}: expected {{prompt: [answer, ...]}}")
        used: Counter = Counter()
    else:
        lines = _read_jsonl(args.layouts, "layouts")
        by_key = {_line_key(line): line for line in lines}  # the last line of a key wins (resumed runs)

    seen: Counter = Counter()
    for number, row in enumerate(prompts):
        prompt, task = row["prompt"], row.get("task")
        sample = seen[prompt]
        seen[prompt] += 1
        try:
            spec = parse_benchmark_prompt(prompt, task)
        except BenchmarkPromptError as exc:
            raise CLIError(f"{args.prompts}: line {number + 1}: {exc}") from None
        detections = None
        if args.responses:
            answers = responses.get(prompt.strip().rstrip(".")) or responses.get(prompt) or []
            if used[prompt] >= len(answers):
                missing += 1
                continue
            text = answers[used[prompt]]
            used[prompt] += 1
            try:
                answer = parse_answer(text)
                detections = answer_detections(answer)
                fixed = layout_detections(build_layout(answer))
            except (LayoutParseError, ValidationError) as exc:
                errors += 1
                failures.append({"index": row.get("index", number), "task": spec.task, "prompt": prompt, "reason": f"parse error: {exc}"})
                published.append((spec.task, False))
                repaired.append((spec.task, False))
                continue
        else:
            key = f"index:{row['index']}" if "index" in row else f"prompt:{prompt}#{sample}"
            line = by_key.get(key)
            if line is None:
                missing += 1
                continue
            if "layout" not in line:
                errors += 1
                failures.append({"index": row.get("index", number), "task": spec.task, "prompt": prompt, "reason": f"planning failed: {line.get('error')}"})
                published.append((spec.task, False))
                repaired.append((spec.task, False))
                continue
            try:
                layout = Layout.model_validate(line["layout"])
            except ValidationError as exc:
                raise CLIError(f"{args.layouts}: the layout of {key} is invalid: {exc.errors()[0]['msg']}") from None
            detections = fixed = layout_detections(layout)
        result = evaluate(spec, detections)
        published.append((spec.task, result.passed))
        repaired.append((spec.task, evaluate(spec, fixed).passed))
        if not result.passed:
            failures.append({"index": row.get("index", number), "task": spec.task, "prompt": prompt, "reason": result.detail})
        checks = strict_checks(detections, max_iou=args.max_iou, min_box_px=args.min_box_px)
        if args.layouts:  # stored layouts are repaired already: their warnings tell what was outside
            checks["inside_canvas"] = not any(w.startswith(("clipped:", "dropped:")) and "canvas" in w for w in layout.warnings)
        strict.update(name for name, ok in checks.items() if ok)
        strict["all"] += all(checks.values())
        strict["scored"] += 1

    if not published:
        raise CLIError("nothing to score: no prompt of the prompts file has a layout or a response")
    scored = strict.pop("scored", 0)
    report = {
        "source": str(args.responses or args.layouts),
        "published": _tally(published),
        "after_repair": _tally(repaired),
        "strict": {
            name: {"passed": strict[name], "total": scored, "rate": round(100 * strict[name] / scored, 1) if scored else 0.0}
            for name in ("inside_canvas", "overlap", "min_size", "all")
        },
        "strict_thresholds": {"max_iou": args.max_iou, "min_box_px": args.min_box_px},
        "parse_or_plan_errors": errors,
        "missing": missing,
        "failures": failures,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"LMD layout-level accuracy of {report['source']} (published rules)")
    print(f"{'task':<12} {'passed':>7} {'total':>6} {'accuracy':>9} {'after repair':>13}")
    for task, row in report["published"].items():
        after = report["after_repair"][task]["accuracy"]
        print(f"{task:<12} {row['passed']:>7} {row['total']:>6} {row['accuracy']:>8.1f}% {after:>12.1f}%")
    print(f"stricter checks (not in the published score; over {scored} scored layouts):")
    labels = {
        "inside_canvas": "boxes inside the canvas before repair",
        "overlap": f"no pair of boxes with IoU > {args.max_iou:g}",
        "min_size": f"every box side >= {args.min_box_px} px of 512",
        "all": "all of the above",
    }
    for name, row in report["strict"].items():
        print(f"  {labels[name]:<40} {row['passed']:>4}/{row['total']:<4} {row['rate']:>6.1f}%")
    if errors or missing:
        print(f"parse/plan errors: {errors}; prompts without a layout or response: {missing}")
    if args.show_failures:
        for failure in failures:
            print(f"  FAIL [{failure['task']}] #{failure['index']} {failure['prompt']!r}: {failure['reason']}")
    elif failures:
        print(f"{len(failures)} failed prompts (--show-failures lists them)")
    return 0
