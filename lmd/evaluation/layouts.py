"""The LMD benchmark at layout level (``lmd eval-layouts``): score layouts, or raw LLM answers, per task.

Each benchmark prompt is scored with the published rules (``layout_planner.benchmark``) on the
boxes as the LLM gave them, and again after our repair (clipping, dropping boxes off the
canvas); stricter checks that the published score does not make (boxes inside the canvas, no
heavy overlap, no tiny box) are counted on the side. A prompt without a usable layout fails.
The CLI reads the files and prints; this module only scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

TASK_ORDER = {"negation": 0, "numeracy": 1, "attribution": 2, "spatial": 3}
STRICT_CHECKS = ("inside_canvas", "overlap", "min_size", "all")


class LayoutEvalError(ValueError):
    """An input cannot be scored (a prompt the rules do not know, an invalid stored layout)."""


def layout_key(row: dict[str, Any], sample: int) -> str:
    """The key that ties a prompt to its planned layout: its index, else its text and occurrence."""
    return f"index:{row['index']}" if "index" in row else f"prompt:{row.get('prompt')}#{sample}"


def tally(results: list[tuple[str, bool]]) -> dict[str, dict[str, float]]:
    """Passed, total and accuracy (%) per task in the benchmark's order, then overall."""
    table: dict[str, dict[str, float]] = {}
    for task in sorted({t for t, _ in results}, key=lambda t: (t not in TASK_ORDER, TASK_ORDER.get(t, 0), t)):
        passed = sum(ok for t, ok in results if t == task)
        total = sum(1 for t, _ in results if t == task)
        table[task] = {"passed": passed, "total": total, "accuracy": round(100 * passed / total, 1)}
    passed, total = sum(ok for _, ok in results), len(results)
    table["overall"] = {"passed": passed, "total": total, "accuracy": round(100 * passed / total, 1) if total else 0.0}
    return table


@dataclass
class LayoutScores:
    """What scoring the prompts one by one accumulates."""

    max_iou: float
    min_box_px: int
    published: list[tuple[str, bool]] = field(default_factory=list)
    repaired: list[tuple[str, bool]] = field(default_factory=list)
    strict: Counter = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    readings: Counter = field(default_factory=Counter)  # answers read with an uncertain reading, by tag
    errors: int = 0
    missing: int = 0

    def fail(self, index: Any, task: str, prompt: str, reason: str) -> None:
        """A prompt without a usable layout fails both scores."""
        self.errors += 1
        self.failures.append({"index": index, "task": task, "prompt": prompt, "reason": reason})
        self.published.append((task, False))
        self.repaired.append((task, False))

    def score(self, spec, index: Any, prompt: str, detections, fixed, inside_canvas: bool | None = None) -> None:
        """Score one prompt's boxes as given (``detections``) and repaired (``fixed``)."""
        from layout_planner.benchmark import evaluate, strict_checks

        result = evaluate(spec, detections)
        self.published.append((spec.task, result.passed))
        self.repaired.append((spec.task, evaluate(spec, fixed).passed))
        if not result.passed:
            self.failures.append({"index": index, "task": spec.task, "prompt": prompt, "reason": result.detail})
        checks = strict_checks(detections, max_iou=self.max_iou, min_box_px=self.min_box_px)
        if inside_canvas is not None:
            checks["inside_canvas"] = inside_canvas
        self.strict.update(name for name, ok in checks.items() if ok)
        self.strict["all"] += all(checks.values())
        self.strict["scored"] += 1

    def report(self, source: str) -> dict[str, Any]:
        if not self.published:
            raise LayoutEvalError("nothing to score: no prompt of the prompts file has a layout or a response")
        scored = self.strict["scored"]
        return {
            "source": source,
            "published": tally(self.published),
            "after_repair": tally(self.repaired),
            "strict": {
                name: {"passed": self.strict[name], "total": scored,
                       "rate": round(100 * self.strict[name] / scored, 1) if scored else 0.0}
                for name in STRICT_CHECKS
            },
            "strict_thresholds": {"max_iou": self.max_iou, "min_box_px": self.min_box_px},
            "uncertain_readings": dict(sorted(self.readings.items())),
            "parse_or_plan_errors": self.errors,
            "missing": self.missing,
            "failures": self.failures,
        }


def _benchmark_prompts(prompts: list[dict[str, Any]], prompts_label: str) -> Iterator[tuple[int, dict, Any, int]]:
    """(line number from 0, row, parsed spec, occurrence of the same text so far) per prompt."""
    from layout_planner.benchmark import BenchmarkPromptError, parse_benchmark_prompt

    seen: Counter = Counter()
    for number, row in enumerate(prompts):
        prompt = row["prompt"]
        sample = seen[prompt]
        seen[prompt] += 1
        try:
            spec = parse_benchmark_prompt(prompt, row.get("task"))
        except BenchmarkPromptError as exc:
            raise LayoutEvalError(f"{prompts_label}: line {number + 1}: {exc}") from None
        yield number, row, spec, sample


def score_responses(prompts: list[dict[str, Any]], responses: dict[str, list[str]], *, prompts_label: str,
                    max_iou: float, min_box_px: int) -> LayoutScores:
    """Replay raw LLM answers ``{prompt: [answer, ...]}``: the n-th occurrence of a prompt takes the n-th answer."""
    from layout_planner import LayoutParseError
    from layout_planner.benchmark import answer_detections, layout_detections
    from layout_planner.read import parse_answer
    from layout_planner.repair import build_layout

    scores = LayoutScores(max_iou=max_iou, min_box_px=min_box_px)
    used: Counter = Counter()
    for number, row, spec, _ in _benchmark_prompts(prompts, prompts_label):
        prompt = row["prompt"]
        answers = responses.get(prompt.strip().rstrip(".")) or responses.get(prompt) or []
        if used[prompt] >= len(answers):
            scores.missing += 1
            continue
        text = answers[used[prompt]]
        used[prompt] += 1
        try:
            answer = parse_answer(text)
            scores.readings.update({note.tag for note in answer.notes})
            detections = answer_detections(answer)
            fixed = layout_detections(build_layout(answer))
        except (LayoutParseError, ValidationError) as exc:
            scores.fail(row.get("index", number), spec.task, prompt, f"parse error: {exc}")
            continue
        scores.score(spec, row.get("index", number), prompt, detections, fixed)
    return scores


def match_layouts(prompts: list[dict[str, Any]], lines: list[dict[str, Any]], *, prompts_label: str,
                  layouts_label: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The lines of a layouts file by (prompt text, sample index), the last line of a key winning
    (a resumed run appends). Matching is by text, never by position or index: a line without a
    prompt, or for a prompt the benchmark does not have, is a :class:`LayoutEvalError` (a file
    planned for other prompts would otherwise be scored against these)."""
    benchmark = {row["prompt"].strip() for row in prompts}
    matched: dict[tuple[str, int], dict[str, Any]] = {}
    foreign: list[str] = []
    for number, line in enumerate(lines, 1):
        prompt = line.get("prompt")
        if not isinstance(prompt, str):
            raise LayoutEvalError(f"{layouts_label}: line {number} has no \"prompt\" string (layouts are matched to "
                                  "the benchmark's prompts by their text)")
        if prompt.strip() not in benchmark:
            foreign.append(prompt)
            continue
        matched[(prompt.strip(), int(line.get("sample_index", 0)))] = line
    if foreign:
        raise LayoutEvalError(
            f"{layouts_label}: {len(foreign)} of {len(lines)} layouts are for prompts that are not in {prompts_label} "
            f"(first: {foreign[0]!r}); score layouts planned from the same prompts file (lmd plan --prompts-file)"
        )
    return matched


def score_layouts(prompts: list[dict[str, Any]], lines: list[dict[str, Any]], *, prompts_label: str,
                  layouts_label: str, max_iou: float, min_box_px: int) -> LayoutScores:
    """Score the layouts ``lmd plan --prompts-file`` wrote, matched to ``prompts`` by their text
    (:func:`match_layouts`).

    Stored layouts are repaired already: their warnings tell which boxes lay outside the canvas.
    """
    from layout_planner import Layout
    from layout_planner.benchmark import layout_detections

    matched = match_layouts(prompts, lines, prompts_label=prompts_label, layouts_label=layouts_label)
    scores = LayoutScores(max_iou=max_iou, min_box_px=min_box_px)
    for number, row, spec, sample in _benchmark_prompts(prompts, prompts_label):
        line = matched.get((row["prompt"].strip(), sample))
        if line is None:
            scores.missing += 1
            continue
        if "layout" not in line:
            scores.fail(row.get("index", number), spec.task, row["prompt"], f"planning failed: {line.get('error')}")
            continue
        try:
            layout = Layout.model_validate(line["layout"])
        except ValidationError as exc:
            raise LayoutEvalError(f"{layouts_label}: the layout of {row['prompt']!r} (sample {sample}) is invalid: "
                                  f"{exc.errors()[0]['msg']}") from None
        detections = layout_detections(layout)
        inside = not any(w.tag in ("clipped", "dropped") and "canvas" in w.text for w in layout.warnings)
        scores.score(spec, row.get("index", number), row["prompt"], detections, detections, inside_canvas=inside)
    return scores


def format_report(report: dict[str, Any], *, show_failures: bool) -> str:
    """The report as the terminal shows it: the published table, the stricter checks, the failures."""
    max_iou, min_box_px = report["strict_thresholds"]["max_iou"], report["strict_thresholds"]["min_box_px"]
    lines = [
        f"LMD layout-level accuracy of {report['source']} (published rules)",
        f"{'task':<12} {'passed':>7} {'total':>6} {'accuracy':>9} {'after repair':>13}",
    ]
    for task, row in report["published"].items():
        after = report["after_repair"][task]["accuracy"]
        lines.append(f"{task:<12} {row['passed']:>7} {row['total']:>6} {row['accuracy']:>8.1f}% {after:>12.1f}%")
    lines.append(f"stricter checks (not in the published score; over {report['strict']['all']['total']} scored layouts):")
    labels = {
        "inside_canvas": "boxes inside the canvas before repair",
        "overlap": f"no pair of boxes with IoU > {max_iou:g}",
        "min_size": f"every box side >= {min_box_px} px of 512",
        "all": "all of the above",
    }
    for name, row in report["strict"].items():
        lines.append(f"  {labels[name]:<40} {row['passed']:>4}/{row['total']:<4} {row['rate']:>6.1f}%")
    if report["uncertain_readings"]:
        listed = ", ".join(f"{tag} {count}" for tag, count in report["uncertain_readings"].items())
        lines.append(f"answers read with a warning (layout warnings say how): {listed}")
    errors, missing, failures = report["parse_or_plan_errors"], report["missing"], report["failures"]
    if errors or missing:
        lines.append(f"parse/plan errors: {errors}; prompts without a layout or response: {missing}")
    if show_failures:
        lines += [f"  FAIL [{f['task']}] #{f['index']} {f['prompt']!r}: {f['reason']}" for f in failures]
    elif failures:
        lines.append(f"{len(failures)} failed prompts (--show-failures lists them)")
    return "\n".join(lines)
