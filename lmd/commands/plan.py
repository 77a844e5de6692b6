"""``lmd plan`` (prompt -> layout, one or a batch) and ``lmd eval-layouts`` (the LMD benchmark, layout level).

Stage 1 only: nothing here imports torch. LLM settings come from ``lmd.settings.Settings``
(``LMD_LLM_*``, ``OPENAI_API_KEY``); planner errors become one-line CLI errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmd.cli import CLIError
from lmd.evaluation.layouts import layout_key

# The benchmark data ships with the repository, not the package: resolve it from the repo root.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = REPO_ROOT / "benchmarks" / "data" / "prompts.jsonl"


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


def _planner(say=None):
    """The planner from settings (``LMD_PLANNER``); ``say`` prints one line of progress to stderr: a
    transport retry, or which local model plans and why, its download and loading (done here)."""
    from layout_planner import PlannerError
    from layout_planner.client import needs_api_key
    from lmd import hub, wiring

    settings = wiring.load_settings()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if wiring.choose_planner(settings).kind == "local":
        try:
            hub.prepare([hub.model_source("the layout planner model", settings.local_llm_model, "LMD_LOCAL_LLM_MODEL")])
            return wiring.ready_planner(settings, say=lambda message: say(f"lmd plan: {message}"))
        except PlannerError as exc:
            raise CLIError(str(exc)) from None
    config = wiring.llm_config(settings)
    if needs_api_key(config):
        raise CLIError(
            f"no API key for {config.base_url}: set LMD_LLM_API_KEY or OPENAI_API_KEY, "
            "or LMD_LLM_BASE_URL to a server that needs none"
        )
    planner = wiring.planner(settings, on_retry=lambda message: say(f"lmd plan: {config.base_url}: {message}"))
    try:
        planner.client.check_reachable()
    except PlannerError as exc:
        raise CLIError(str(exc)) from None
    return planner


def _check_draw_path(path: Path) -> None:
    """Refuse a --draw path we could not write before asking the LLM (a paid request), not after."""
    from PIL import Image

    if path.is_dir():
        raise CLIError(f"--draw {path}: is a directory")
    suffix = path.suffix.lower()
    if suffix not in Image.registered_extensions():
        raise CLIError(f"--draw {path}: unknown image type {suffix or '(no extension)'!r}; use a .png name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"--draw {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CLIError(f"--draw {path}: not writable")


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
    if args.draw:
        _check_draw_path(args.draw)
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
    for warning in layout.warnings:  # also in the JSON; said here so that a repaired answer is noticed
        print(f"lmd plan: warning: {warning}", file=sys.stderr)
    if args.draw:
        from layout_planner.draw import draw_layout

        try:
            draw_layout(layout).save(args.draw)
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot write {args.draw}: {getattr(exc, 'strerror', None) or exc}") from None
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
        key = layout_key(row, sample)
        items.append({"key": key, "row": row, "sample_index": sample})
    return items


def _line_key(line: dict[str, Any]) -> str:
    return layout_key(line, line.get("sample_index", 0))


def _drop_torn_last_line(path: Path) -> None:
    """A run killed mid-write can leave a last line without its newline: cut it so appends stay whole lines."""
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        data_start = max(0, size - 1_000_000)
        handle.seek(data_start)
        tail = handle.read()
        cut = data_start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        handle.truncate(cut)
    print(f"lmd plan: {path}: dropped an incomplete last line ({size - cut} bytes) left by an interrupted run", file=sys.stderr)


def _append_line(fd: int, line: dict[str, Any]) -> None:
    """One output line in one ``write`` on an O_APPEND descriptor: an interrupt leaves whole lines only."""
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    written = os.write(fd, data)
    while written < len(data):  # short writes only happen on full disks and the like
        written += os.write(fd, data[written:])


def _run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from layout_planner import PlannerError

    items = _batch_items(_read_jsonl(args.prompts_file, "prompts file"), args.prompts_file)
    if args.out.exists():
        _drop_torn_last_line(args.out)
    done = {_line_key(line) for line in (_read_jsonl(args.out, "output") if args.out.exists() else []) if "layout" in line}
    pending = [item for item in items if item["key"] not in done]
    already = len(items) - len(pending)
    if args.limit is not None:
        pending = pending[: args.limit]
    planner = _planner(say=lambda text: tqdm.write(text, file=sys.stderr))
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        planner.close()
        raise CLIError(f"cannot write {args.out}: {exc.strerror}") from None
    planned = failed = 0
    # The bar ends where this run ends: the prompts done before it plus those it plans (--limit).
    bar = tqdm(total=already + len(pending), initial=already, desc="planning", unit="prompt", file=sys.stderr)
    try:
        for item in pending:
            row = item["row"]
            line: dict[str, Any] = {k: row[k] for k in ("index", "task") if k in row}
            line.update(prompt=row["prompt"], sample_index=item["sample_index"])
            try:
                layout = planner.plan(row["prompt"], sample_index=item["sample_index"])
                line["layout"] = layout.model_dump(mode="json")
                planned += 1
            except PlannerError as exc:
                failed += 1
                line.update(error=str(exc), error_type=type(exc).__name__)
            _append_line(fd, line)
            bar.update(1)
            bar.set_postfix(failed=failed)
    except KeyboardInterrupt:
        bar.close()
        print(
            f"lmd plan: interrupted: planned {planned}, failed {failed} in this run, all written to {args.out}; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        raise
    finally:
        bar.close()
        planner.close()
        os.close(fd)
    print(f"planned {planned}, failed {failed}, already done {already} -> {args.out}", file=sys.stderr)
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


def _read_responses(path: Path) -> dict[str, list[str]]:
    try:
        responses = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not JSON ({exc.msg})") from None
    if not isinstance(responses, dict):
        raise CLIError(f"{path}: expected {{prompt: [answer, ...]}}")
    return responses


def run_eval_layouts(args: argparse.Namespace) -> int:
    from lmd.evaluation.layouts import LayoutEvalError, format_report, score_layouts, score_responses

    prompts = _load_prompts(args.prompts)
    thresholds = {"prompts_label": str(args.prompts), "max_iou": args.max_iou, "min_box_px": args.min_box_px}
    try:
        if args.responses:
            scores = score_responses(prompts, _read_responses(args.responses), **thresholds)
        else:
            lines = _read_jsonl(args.layouts, "layouts")
            scores = score_layouts(prompts, lines, layouts_label=str(args.layouts), **thresholds)
        report = scores.report(str(args.responses or args.layouts))
    except LayoutEvalError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(report, indent=2) if args.json else format_report(report, show_failures=args.show_failures))
    return 0
