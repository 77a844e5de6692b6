"""The benchmark's prompts, the subset a quick run uses, and recorded LLM responses.

``benchmarks/data/prompts.jsonl`` holds 400 prompts, 100 per task, some repeated (negation
10 x 10, numeracy 50 x 2). Recorded responses (``{prompt: [response, ...]}``) give the k-th
occurrence of a prompt its k-th response, as in the published evaluation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from layout_planner.benchmark import TASKS, Task
from layout_planner.layout import Layout

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "prompts.jsonl"


class BenchmarkDataError(ValueError):
    """A prompts or responses file that is missing or does not have the expected shape."""


class BenchmarkPrompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    index: int
    task: Task
    prompt: str
    layout: Layout | None = None  # the layout a perfect planner gives (the shapes world's prompt set)


def load_prompts(path: Path = DEFAULT_PROMPTS) -> list[BenchmarkPrompt]:
    """Every prompt of the file, in file order; indices must be unique."""
    if not path.is_file():
        raise BenchmarkDataError(f"prompts file not found: {path}")
    prompts: list[BenchmarkPrompt] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(BenchmarkPrompt.model_validate_json(line))
        except ValidationError as exc:
            raise BenchmarkDataError(f"{path}:{number}: not a benchmark prompt ({exc.errors()[0]['msg']})") from exc
    indices = [p.index for p in prompts]
    if len(set(indices)) != len(indices):
        raise BenchmarkDataError(f"{path}: prompt indices are not unique")
    return prompts


def select_prompts(prompts: list[BenchmarkPrompt], limit: int | None) -> list[BenchmarkPrompt]:
    """``limit`` prompts spread over the tasks and, within a task, evenly over its prompts.

    Tasks take turns (``limit=4`` gives one prompt per task; ``limit=6`` two for negation and
    numeracy, one for the others); a task with ``n`` picks out of ``m`` prompts takes the
    prompts at positions ``floor(j * m / n)``, so a small run still sees different objects
    and counts rather than the first (repeated) prompts. ``None``: every prompt.
    """
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise BenchmarkDataError(f"--limit must be at least 1, got {limit}")
    by_task: dict[str, list[BenchmarkPrompt]] = defaultdict(list)
    for prompt in prompts:
        by_task[prompt.task].append(prompt)
    tasks = [t for t in TASKS if by_task[t]]
    quota = {t: 0 for t in tasks}
    remaining = limit
    while remaining:
        progressed = False
        for task in tasks:
            if remaining and quota[task] < len(by_task[task]):
                quota[task] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    chosen = []
    for task in tasks:
        pool, n = by_task[task], quota[task]
        chosen += [pool[j * len(pool) // n] for j in range(n)]
    return sorted(chosen, key=lambda p: p.index)


def load_responses(path: Path, prompts: list[BenchmarkPrompt]) -> dict[int, str]:
    """The recorded response of every prompt, by prompt index (k-th occurrence -> k-th response)."""
    if not path.is_file():
        raise BenchmarkDataError(f"responses file not found: {path}")
    try:
        book = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BenchmarkDataError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(book, dict) or not all(isinstance(v, list) and all(isinstance(r, str) for r in v) for v in book.values()):
        raise BenchmarkDataError(f"{path} must map each prompt to a list of response strings")
    seen: dict[str, int] = defaultdict(int)
    responses: dict[int, str] = {}
    for prompt in sorted(prompts, key=lambda p: p.index):
        answers = book.get(prompt.prompt)
        k = seen[prompt.prompt]
        seen[prompt.prompt] += 1
        if not answers or k >= len(answers):
            raise BenchmarkDataError(
                f"{path} has {len(answers or [])} response(s) for {prompt.prompt!r}, occurrence {k + 1} needs one more"
            )
        responses[prompt.index] = answers[k]
    return responses


def occurrence_numbers(prompts: list[BenchmarkPrompt]) -> dict[int, int]:
    """For each prompt index, how many earlier prompts have the same text (the LLM sample index)."""
    seen: dict[str, int] = defaultdict(int)
    numbers = {}
    for prompt in sorted(prompts, key=lambda p: p.index):
        numbers[prompt.index] = seen[prompt.prompt]
        seen[prompt.prompt] += 1
    return numbers
