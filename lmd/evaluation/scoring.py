"""Accuracy per task and overall, with 95% Wilson score intervals, and the markdown table.

Why Wilson: per-task samples are small (100 prompts, 1 to 25 in quick runs) and accuracies
sit near 0 or 1 (negation is often 100%), where the normal approximation gives intervals
outside 0..1 or of zero width; the Wilson interval stays inside 0..1 and is deterministic
(a bootstrap would need a seed and resamples to say the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel

from layout_planner.benchmark import TASKS

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class Accuracy(BaseModel):
    passed: int
    total: int
    accuracy: float | None  # None when total == 0
    ci95: tuple[float, float] | None


def wilson_interval(passed: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``passed / total``."""
    if total <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    if not 0 <= passed <= total:
        raise ValueError(f"passed={passed} must lie in 0..total={total}")
    p = passed / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(outcomes: Iterable[bool]) -> Accuracy:
    outcomes = list(outcomes)
    passed, total = sum(outcomes), len(outcomes)
    if total == 0:
        return Accuracy(passed=0, total=0, accuracy=None, ci95=None)
    low, high = wilson_interval(passed, total)
    return Accuracy(passed=passed, total=total, accuracy=passed / total, ci95=(round(low, 4), round(high, 4)))


def summarise(outcomes: Iterable[tuple[str, bool]]) -> dict[str, Accuracy]:
    """Accuracy of each task (in the benchmark's order) and ``overall`` (pooled over every prompt scored)."""
    outcomes = list(outcomes)
    summary = {task: accuracy(ok for t, ok in outcomes if t == task) for task in TASKS}
    summary["overall"] = accuracy(ok for _, ok in outcomes)
    return summary


def _cell(acc: Accuracy, with_ci: bool) -> str:
    if acc.accuracy is None:
        return "-"
    text = f"{100 * acc.accuracy:.1f}"
    if with_ci and acc.ci95 is not None:
        text += f" [{100 * acc.ci95[0]:.0f}, {100 * acc.ci95[1]:.0f}]"
    return text


def markdown_table(rows: dict[str, dict[str, Accuracy]], with_ci: bool = True) -> str:
    """One row per method: accuracy in % per task and overall, with the 95% interval in brackets."""
    columns = [*TASKS, "overall"]
    lines = [
        "| method | " + " | ".join(columns) + " | prompts |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    for method, summary in rows.items():
        cells = [_cell(summary[c], with_ci) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {summary['overall'].total} |")
    return "\n".join(lines) + "\n"
