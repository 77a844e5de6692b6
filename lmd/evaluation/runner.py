"""The image-level LMD benchmark, end to end: layout -> image -> detections -> rule -> accuracy.

An output directory holds one run:

    run.json                   what fixes the images (variant, preset, steps, model, scheduler, dtype, seed, size, layouts)
    layouts/NNN.json           the layout of prompt NNN (kept: a resumed run asks no LLM twice)
    images/NNN.png             the generated image of prompt NNN (kept: a resumed run skips it)
    results.json, results.md   scores, rewritten by every run, also when it stops early

A second run on the same directory regenerates nothing that is on disk and whole (a file that
does not decode is made again); it refuses to mix images of different settings. Detection and scoring always rerun (they are cheap next to
generation, and a run may change the detector).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from grounded_sd.names import Preset, Variant
from layout_planner.benchmark import BenchmarkSpec, evaluate, parse_benchmark_prompt
from layout_planner.errors import LLMBadOutput
from layout_planner.layout import Layout
from layout_planner.rescale import rescale_boxes
from lmd.evaluation.detection import Detection, DetectorConfig
from lmd.evaluation.placement import ObjectPlacement, PlacementSummary, placement_table, place, summarise_placement
from lmd.evaluation.prompts import BenchmarkPrompt
from lmd.evaluation.scoring import Accuracy, markdown_table, summarise

if TYPE_CHECKING:
    from PIL import Image

RESULTS_SCHEMA = "lmd-eval/2"  # 2: run settings pin scheduler and dtype; options, environment, replaced, incomplete, scored

LayoutSource = Callable[[BenchmarkPrompt], Layout]
ImageGenerator = Callable[[Layout, int], "Image.Image"]
Detector = Callable[["Image.Image", list[str]], list[Detection]]


class EvalConflict(RuntimeError):
    """The output directory holds a run with other settings; its images would be mixed with new ones."""


class RunSettings(BaseModel):
    """Everything that decides a run's images; stored in ``run.json`` and checked on resume
    (all but ``method``, the table's row name, which may change between runs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description="row name of the table, e.g. 'lmd (responses gpt-3.5-turbo)'")
    variant: Variant
    preset: Preset
    conditioning: str = Field("clip", description="what the denoising was conditioned on (docs/conditioning.md)")
    steps: int = Field(description="denoising steps (the preset's unless --steps)")
    model: str
    scheduler: str = Field(description="diffusers scheduler class (LMD_SCHEDULER)")
    dtype: str = Field(description="resolved weights dtype: float16, bfloat16 or float32")
    layouts: str = Field(description="where layouts come from: responses file and digest, planner endpoint, or 'prompt' for the SD baseline")
    sam: str | None = Field(None, description="SAM checkpoint file and type used for masks; None: attention masks")
    seed: int = Field(description="prompt NNN uses seed + NNN")
    width: int
    height: int
    boxes_stretched: bool = Field(
        False,
        description=(
            "the method stretched the layout's boxes over the canvas before drawing (LMDOptions.rescale_boxes, on under "
            "the reference preset): placement is measured against the stretched boxes, the ones the image was drawn for"
        ),
    )


class PromptOutcome(BaseModel):
    index: int
    task: str
    prompt: str
    seed: int
    image: str | None = Field(None, description="path relative to the output directory")
    objects: int | None = Field(None, description="boxes in the layout")
    queries: list[str] = Field(default_factory=list)
    detections: list[Detection] = Field(default_factory=list)
    placement: list[ObjectPlacement] = Field(
        default_factory=list, description="each object of the reference layout: drawn in its box? (lmd.evaluation.placement)"
    )
    passed: bool
    scored: bool = Field(True, description="False: no layout yet (the LLM was unavailable); not in the scores")
    detail: str
    error: str | None = None


class EvalResults(BaseModel):
    schema_: str = Field(RESULTS_SCHEMA, alias="schema")
    created: str
    settings: RunSettings
    detector: DetectorConfig
    options: dict[str, Any] = Field(default_factory=dict, description="the controller options every image used (the preset, expanded)")
    environment: dict[str, str | None] = Field(default_factory=dict, description="package versions, device, GPU")
    scores: dict[str, Accuracy]
    placement: dict[str, PlacementSummary] = Field(default_factory=dict, description="objects drawn in their boxes, per task")
    generated: int = Field(description="images generated by this run (the others were on disk)")
    replaced: int = Field(0, description="of those, images that were on disk but did not decode (cut short, corrupt)")
    errors: int = Field(description="prompts that failed without an image: no parseable layout, or a layout the controller refused")
    incomplete: Incomplete | None = Field(None, description="set when the run stopped early or the LLM was unavailable for some prompts")
    prompts: list[PromptOutcome]

    model_config = ConfigDict(populate_by_name=True)


class Incomplete(BaseModel):
    prompts: list[int] = Field(description="indices of the prompts not scored yet (a rerun of the same command does them)")
    reason: str


@dataclass
class RunCounters:
    generated: int = 0
    replaced: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def detector_queries(spec: BenchmarkSpec) -> list[str]:
    """Plain names to detect: the objects, with their colours for attribution (``"red backpack"``)."""
    if spec.task == "attribution":
        return [f"{colour} {obj}" for colour, obj in zip(spec.colours, spec.objects)]
    return list(dict.fromkeys(spec.objects))


def hold_run_lock(out: Path) -> IO[str]:
    """An exclusive lock on ``out`` for this process (released when the handle closes or the
    process dies): two runs on one directory would generate the same images twice and
    overwrite each other's results."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise EvalConflict(f"another lmd eval (pid {holder}) is running in {out}; wait for it or use another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def prepare_output(out: Path, settings: RunSettings) -> None:
    """Create the run directory, or check that what it holds was made with the same settings.

    Images on disk pin every setting; layouts alone pin only the layout source (a run that
    failed before its first image may be rerun with, say, a corrected --model).
    """
    manifest = out / "run.json"
    if manifest.is_file():
        try:
            existing = RunSettings.model_validate_json(manifest.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise EvalConflict(f"{manifest} is not a run manifest ({exc.errors()[0]['msg']}); use another --out") from exc
        if any((out / "images").glob("*.png")):
            pinned = [name for name in RunSettings.model_fields if name != "method"]
        elif any((out / "layouts").glob("*.json")):
            pinned = ["layouts"]
        else:
            pinned = []
        changed = [
            f"{name} {getattr(existing, name)!r} -> {getattr(settings, name)!r}"
            for name in pinned
            if getattr(existing, name) != getattr(settings, name)
        ]
        if changed:
            raise EvalConflict(
                f"{out} holds a run with other settings ({'; '.join(changed)}); rerun with its settings to resume it, or use another --out"
            )
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "layouts").mkdir(parents=True, exist_ok=True)
    _write_atomic(manifest, settings.model_dump_json(indent=2))


MAX_CONSECUTIVE_UNAVAILABLE = 3  # an LLM that fails this many prompts in a row is down: stop instead of skipping all


class EvalIncomplete(RuntimeError):
    """Some prompts got no layout because the LLM was unavailable; the others are scored and written."""

    def __init__(self, message: str, results: "EvalResults"):
        super().__init__(message)
        self.results = results


def run_benchmark(
    prompts: list[BenchmarkPrompt],
    *,
    out: Path,
    settings: RunSettings,
    layout_source: LayoutSource,
    make_generator: Callable[[], ImageGenerator],
    detector: Detector,
    detector_config: DetectorConfig,
    options: dict[str, Any] | None = None,
    environment: dict[str, str | None] | None = None,
    on_prompt: Callable[[BenchmarkPrompt, str], None] | None = None,
) -> EvalResults:
    """Score ``prompts``; generate only the images missing from ``out``.

    ``make_generator`` is called at most once, when the first missing image is needed, so a
    fully resumed run never loads the diffusion model. ``on_prompt(prompt, what)`` is told
    ``"generated"``, ``"skipped"``, ``"failed"`` or ``"pending"`` after each prompt (the
    CLI's progress bar).

    What one prompt's failure does to a long run:

    - the LLM's answer never parses (``LLMBadOutput``), or the controller refuses the layout
      (``InvalidLayoutError``): the prompt fails (scored 0; the reference skipped prompts without
      an image, shrinking the denominator, so a failing method could gain); the run goes on;
    - the LLM is unavailable (``LLMUnavailable``, after the planner's bounded retries): the
      prompt is left unscored and the run goes on, so a short outage does not idle the GPU;
      after ``MAX_CONSECUTIVE_UNAVAILABLE`` in a row the LLM is taken as down and the run
      stops; either way :class:`EvalIncomplete` is raised at the end, a rerun completes it;
    - anything else (the model cannot run the variant, out of memory, Ctrl-C) stops the run.

    ``results.json`` is written in every case, with the prompts finished so far, and
    ``incomplete`` naming what is left; finished layouts and images stay on disk.
    """
    lock = hold_run_lock(out)
    try:
        prepare_output(out, settings)
        run = _BenchmarkRun(prompts, out, settings, layout_source, make_generator, detector, on_prompt)
        try:
            for prompt in prompts:
                run.prompt(prompt)
        except BaseException as exc:
            stopped = f"stopped by {type(exc).__name__}: {exc}".splitlines()[0]
            write_results(out, run.results(detector_config, options, environment, stopped=stopped))
            raise
        final = run.results(detector_config, options, environment)
        write_results(out, final)
    finally:
        lock.close()
    if final.incomplete:
        raise EvalIncomplete(
            f"{len(final.incomplete.prompts)} prompt(s) have no layout yet ({final.incomplete.reason}); "
            f"the other {final.scores['overall'].total} are scored; run the same command again to complete the run",
            final,
        )
    return final


@dataclass
class _BenchmarkRun:
    """One pass over the prompts: what each prompt came to, and what the run counted."""

    prompts: list[BenchmarkPrompt]
    out: Path
    settings: RunSettings
    layout_source: LayoutSource
    make_generator: Callable[[], ImageGenerator]
    detector: Detector
    on_prompt: Callable[[BenchmarkPrompt, str], None] | None
    counters: RunCounters = field(default_factory=RunCounters)
    generator: ImageGenerator | None = None
    outcomes: list[PromptOutcome] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    unavailable_in_a_row: int = 0

    def results(self, detector_config: DetectorConfig, options: dict[str, Any] | None,
                environment: dict[str, str | None] | None, stopped: str | None = None) -> EvalResults:
        done = {o.index for o in self.outcomes}
        left = [p.index for p in self.prompts if p.index not in done]
        unscored = [o.index for o in self.outcomes if not o.scored]
        return EvalResults(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            settings=self.settings,
            detector=detector_config,
            options=options or {},
            environment=environment or {},
            scores=summarise((o.task, o.passed) for o in self.outcomes if o.scored),
            placement=summarise_placement((o.task, o.placement) for o in self.outcomes if o.scored),
            generated=self.counters.generated,
            replaced=self.counters.replaced,
            errors=len(self.counters.errors),
            incomplete=Incomplete(prompts=sorted(left + unscored), reason=stopped or self.pending[-1])
            if left or self.pending
            else None,
            prompts=self.outcomes,
        )

    def prompt(self, prompt: BenchmarkPrompt) -> None:
        """Layout, image (generated unless whole on disk), detections and the rule for one prompt."""
        seed = self.settings.seed + prompt.index
        spec = parse_benchmark_prompt(prompt.prompt, prompt.task)
        queries = detector_queries(spec)
        layout = self._layout(prompt, seed, queries)
        if layout is None:
            return
        image_path = self.out / "images" / f"{prompt.index:03d}.png"
        what = self._image(prompt, layout, seed, queries, image_path)
        if what is None:
            return
        self._score(prompt, spec, layout, seed, queries, image_path)
        self._told(prompt, what)

    def _layout(self, prompt: BenchmarkPrompt, seed: int, queries: list[str]) -> Layout | None:
        """The prompt's layout; None when it has none (recorded as failed, or pending while the LLM is down)."""
        from layout_planner.errors import LLMUnavailable

        try:
            layout = _layout_for(prompt, self.out, self.layout_source)
        except LLMBadOutput as exc:
            self.unavailable_in_a_row = 0
            self._failed(prompt, seed, queries, "no layout", exc)
            self.counters.errors.append(f"{prompt.index}: {exc}")
            self._told(prompt, "failed")
            return None
        except LLMUnavailable as exc:
            self.unavailable_in_a_row += 1
            self._failed(prompt, seed, queries, "no layout yet: the LLM is unavailable", exc, scored=False)
            self.pending.append(f"the LLM is unavailable ({exc})")
            self._told(prompt, "pending")
            if self.unavailable_in_a_row >= MAX_CONSECUTIVE_UNAVAILABLE:
                raise
            return None
        self.unavailable_in_a_row = 0
        return layout

    def _image(self, prompt: BenchmarkPrompt, layout: Layout, seed: int, queries: list[str], path: Path) -> str | None:
        """``skipped`` (whole on disk) or ``generated``; None when the controller refused the layout."""
        from grounded_sd.errors import InvalidRequest

        if _complete_image(path, (self.settings.width, self.settings.height)):
            self.counters.skipped += 1
            return "skipped"
        # missing, or cut short/corrupt (a file copied in, a crash before the data reached the disk)
        replacing = path.exists()
        if self.generator is None:
            self.generator = self.make_generator()
        try:
            with _atomic_path(path) as partial:
                self.generator(layout, seed).save(partial, format="PNG")
        except InvalidRequest as exc:
            self._failed(prompt, seed, queries, "layout refused by the controller", exc)
            self.counters.errors.append(f"{prompt.index}: {exc}")
            self._told(prompt, "failed")
            return None
        self.counters.generated += 1
        self.counters.replaced += replacing
        return "generated"

    def _score(self, prompt: BenchmarkPrompt, spec: BenchmarkSpec, layout: Layout, seed: int, queries: list[str],
               path: Path) -> None:
        from PIL import Image

        with Image.open(path) as image:
            detections = self.detector(image.convert("RGB"), queries)
        found = [d.as_rule_input() for d in detections]
        rule = evaluate(spec, found)
        reference = prompt.layout if prompt.layout is not None else layout  # the SD baseline's own layout has no boxes
        if self.settings.boxes_stretched:
            reference = rescale_boxes(reference)[0]  # the same deterministic stretch the pipeline applied
        self.outcomes.append(
            PromptOutcome(
                index=prompt.index, task=prompt.task, prompt=prompt.prompt, seed=seed,
                image=str(path.relative_to(self.out)), objects=len(layout.objects), queries=queries,
                detections=detections, placement=place(reference, found), passed=rule.passed, detail=rule.detail,
            )
        )  # fmt: skip

    def _failed(self, prompt: BenchmarkPrompt, seed: int, queries: list[str], detail: str, exc: Exception,
                scored: bool = True) -> None:
        self.outcomes.append(
            PromptOutcome(index=prompt.index, task=prompt.task, prompt=prompt.prompt, seed=seed, queries=queries,
                          passed=False, scored=scored, detail=detail, error=f"{type(exc).__name__}: {exc}")
        )  # fmt: skip

    def _told(self, prompt: BenchmarkPrompt, what: str) -> None:
        if self.on_prompt:
            self.on_prompt(prompt, what)


def environment_versions(device: str) -> dict[str, str | None]:
    """What a reader needs to reproduce the numbers: package versions, the device and its GPU."""
    import platform
    from importlib import metadata

    import torch

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("lmd-service", "torch", "diffusers", "transformers", "segment-anything", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["device"] = device
    versions["gpu"] = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return versions


def write_results(out: Path, results: EvalResults) -> None:
    _write_atomic(out / "results.json", results.model_dump_json(indent=2, by_alias=True))
    table = markdown_table({results.settings.method: results.scores})
    note = (
        f"\n{results.scores['overall'].total} prompts, variant {results.settings.variant}, preset {results.settings.preset}, "
        f"{results.settings.width}x{results.settings.height}, detector {results.detector.model} "
        f"(score >= {results.detector.score_threshold}, NMS IoU {results.detector.nms_iou}); "
        "accuracy in %, 95% Wilson interval in brackets.\n"
    )
    if results.placement and results.placement["overall"].objects:
        note += (
            "\nObjects drawn in their layout boxes (a detection naming the object with IoU >= 0.5), in %, mean IoU in brackets; "
            "centred: a detection naming the object has its centre in the box:\n\n"
            + placement_table({results.settings.method: results.placement})
        )
    if results.incomplete:
        note += f"\nINCOMPLETE: {len(results.incomplete.prompts)} prompt(s) not scored ({results.incomplete.reason}).\n"
    _write_atomic(out / "results.md", table + note)


def _layout_for(prompt: BenchmarkPrompt, out: Path, layout_source: LayoutSource) -> Layout:
    """The layout on disk, else from ``layout_source`` (written for the next run). A file that is
    not a layout (edited by hand, damaged) is made again from the source, not a crash."""
    path = out / "layouts" / f"{prompt.index:03d}.json"
    if path.is_file():
        try:
            return Layout.model_validate_json(path.read_text(encoding="utf-8"))
        except (ValidationError, UnicodeDecodeError):
            pass
    layout = layout_source(prompt)
    _write_atomic(path, layout.model_dump_json(indent=2))
    return layout


def _complete_image(path: Path, size: tuple[int, int]) -> bool:
    """Whether ``path`` is a whole image of ``size``: every byte decodes (a truncated PNG opens, then fails to load)."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.load()
            return image.size == size
    except (OSError, SyntaxError, ValueError):
        return False


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling that replaces ``path`` only when the block succeeds and its bytes are
    on disk (fsync), so neither a killed run nor a power cut leaves a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    with _atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def load_results(path: Path) -> EvalResults:
    return EvalResults.model_validate(json.loads(path.read_text(encoding="utf-8")))
