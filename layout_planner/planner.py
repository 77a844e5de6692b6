"""The planner: prompt -> layout, and multi-turn revision (docs/method.md §1).

``Planner.plan`` validates the prompt, looks in the cache, asks the LLM (transport retries in
``LLMClient``), parses and repairs the answer, and re-asks with the parse error appended
when the answer is not a layout, at most ``max_reasks`` asks in all (§1.5).
``Planner.revise`` sends the conversation so far plus an instruction and keeps the ids of
the objects that stayed (§1.7).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from layout_planner.cache import LayoutCache, cache_key
from layout_planner.client import LLMClient, LLMConfig
from layout_planner.errors import InvalidPrompt, LayoutParseError, LLMBadOutput, PlanCanceled
from layout_planner.layout import MAX_OBJECTS, Layout, LayoutObject, LayoutWarning, bounded_warnings
from layout_planner.local import LocalLLMClient, LocalLLMConfig
from layout_planner.read import parse_answer
from layout_planner.repair import build_layout
from layout_planner.text import validate_text
from layout_planner.template import CAPTION_PREFIX, INSTRUCTION_PREFIX, TEMPLATE_VERSION, chat_messages, load_template
from layout_planner.words import head_noun, singular, words_of

# An instruction with one of these words may touch objects it does not name ("remove everything but the cat").
_WHOLE_SCENE_WORDS = {"all", "every", "everything", "only", "except", "anything", "nothing", "empty", "clear", "whole", "entire"}


class Turn(BaseModel):
    """One step of a conversation: the caption (first turn) or an instruction, and the layout it produced."""

    model_config = ConfigDict(extra="forbid")

    text: str
    layout: Layout


@dataclass
class PlanReport:
    """What one plan/revise call did: asks sent, transport attempts, waits (s), cache hit."""

    asks: int = 0
    attempts: int = 0
    waits: list[float] = field(default_factory=list)
    cached: bool = False
    structured: bool = False
    parse_errors: list[str] = field(default_factory=list)
    tokens: int = 0  # answer tokens a local model generated, all asks together


def left_out(previous: Layout, layout: Layout, instruction: str) -> list[LayoutObject]:
    """Objects of ``previous`` missing from a revision although ``instruction`` names neither them nor the whole scene.

    A model that answers with only the changed objects (a partial answer) leaves the others
    out; the template asks for the whole layout (§1.7). An object counts as named when its
    head noun (or its id) is a word of the instruction: "remove the dog" may drop the dog.
    """
    words = set(words_of(instruction))
    words |= {singular(word) for word in words}
    if words & _WHOLE_SCENE_WORDS:
        return []
    kept = {o.id for o in layout.objects}
    return [o for o in previous.objects if o.id not in kept and head_noun(o.phrase) not in words and o.id.lower() not in words]


def with_revision_warnings(previous: Layout, layout: Layout) -> Layout:
    """``layout`` with a warning for each object of ``previous`` it no longer has (``removed``) or
    whose phrase it changed (``renamed``), so that no hand edit disappears unsaid (ours)."""
    now = {o.id: o for o in layout.objects}
    warnings = [
        LayoutWarning(tag="removed", text=f"{o.phrase!r} ({o.id}) is not in the revision")
        for o in previous.objects if o.id not in now
    ] + [
        LayoutWarning(tag="renamed", text=f"{o.id}: {o.phrase!r} became {now[o.id].phrase!r}")
        for o in previous.objects if o.id in now and now[o.id].phrase != o.phrase
    ]
    if not warnings:
        return layout
    return layout.model_copy(update={"warnings": bounded_warnings(layout.warnings + warnings)})


class Planner:
    """Turns prompts into layouts with an LLM. Holds a client, a cache, the template; nothing else.

    ``config`` picks the client: ``LLMConfig`` an OpenAI-compatible endpoint (``LLMClient``),
    ``LocalLLMConfig`` a model in this process (``LocalLLMClient``, loaded on first use).
    ``on_retry``: told in one line about each transport retry, or the local model's download
    and loading, for progress output.
    """

    def __init__(
        self,
        config: LLMConfig | LocalLLMConfig,
        cache: LayoutCache | None = None,
        template_version: str = TEMPLATE_VERSION,
        max_objects: int = MAX_OBJECTS,
        on_retry: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.cache = cache
        self.template = load_template(template_version)
        self.max_objects = max_objects
        if isinstance(config, LocalLLMConfig):
            self.client = LocalLLMClient(config, max_objects=max_objects, say=on_retry)
        else:
            self.client = LLMClient(config, on_retry=on_retry)

    # --- public ----------------------------------------------------------------------------

    def plan(self, prompt: str, sample_index: int = 0, should_cancel: Callable[[], bool] | None = None) -> Layout:
        """The layout for ``prompt``. ``sample_index`` tells repeated samples apart in the cache;
        ``should_cancel`` (checked between asks, and between tokens of a local model) raises ``PlanCanceled``."""
        return self.plan_with_report(prompt, sample_index, should_cancel)[0]

    def revise(self, turns: list[Turn], instruction: str, should_cancel: Callable[[], bool] | None = None) -> Layout:
        """The layout after ``instruction``; ``turns[0]`` is the first caption and its layout."""
        return self.revise_with_report(turns, instruction, should_cancel)[0]

    def plan_with_report(
        self, prompt: str, sample_index: int = 0, should_cancel: Callable[[], bool] | None = None
    ) -> tuple[Layout, PlanReport]:
        prompt = validate_text(prompt, "prompt", self.config.max_prompt_chars)
        if sample_index < 0:
            raise InvalidPrompt(f"sample_index must be >= 0, got {sample_index}")
        messages = chat_messages(self.template, [], CAPTION_PREFIX + prompt)
        return self._ask(messages, self._key(prompt, sample_index), previous=None, should_cancel=should_cancel)

    def revise_with_report(
        self, turns: list[Turn], instruction: str, should_cancel: Callable[[], bool] | None = None
    ) -> tuple[Layout, PlanReport]:
        if not turns:
            raise InvalidPrompt("a revision needs the conversation so far: at least the first prompt and its layout")
        instruction = validate_text(instruction, "instruction", self.config.max_prompt_chars)
        first = validate_text(turns[0].text, "prompt", self.config.max_prompt_chars)
        exchanges = [(CAPTION_PREFIX + first, turns[0].layout.to_llm_json())]
        for turn in turns[1:]:
            text = validate_text(turn.text, "instruction", self.config.max_prompt_chars)
            exchanges.append((INSTRUCTION_PREFIX + text, turn.layout.to_llm_json()))
        messages = chat_messages(self.template, exchanges, INSTRUCTION_PREFIX + instruction)
        layout, report = self._ask(messages, self._key(messages[1:], 0), previous=turns[-1].layout,
                                   instruction=instruction, should_cancel=should_cancel)
        return with_revision_warnings(turns[-1].layout, layout), report

    def close(self) -> None:
        self.client.close()

    # --- internals -------------------------------------------------------------------------

    def _key(self, conversation: list[dict[str, str]] | str, sample_index: int) -> str:
        cfg = self.config
        return cache_key(
            self.template.sha256, cfg.model, cfg.temperature, cfg.max_tokens, conversation, sample_index, cfg.mode
        )

    def _build(self, text: str, previous: Layout | None) -> Layout:
        try:
            return build_layout(parse_answer(text), previous=previous, max_objects=self.max_objects)
        except ValidationError as exc:
            raise LayoutParseError(f"the layout is invalid: {exc.errors()[0]['msg']}") from None

    def _ask(
        self,
        messages: list[dict[str, str]],
        key: str,
        previous: Layout | None,
        instruction: str | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> tuple[Layout, PlanReport]:
        """Ask until an answer is a whole layout, at most ``max_reasks`` times (§1.5).

        Re-asked, with the reason shown to the model: an answer that does not parse, one cut at
        ``max_tokens`` (its complete objects are not the whole layout), and once, a revision
        that leaves out objects the instruction does not mention (a partial answer). A partial
        answer that comes again keeps the left-out objects unchanged, with a ``kept:`` warning.
        """
        report = PlanReport()
        cached = self._cached(key, previous)
        if cached is not None:
            report.cached = True
            return self._keep_left_out(cached, previous, instruction), report
        deadline_s = getattr(self.config, "deadline_s", None)  # one bound for the whole call, all asks
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        conversation = list(messages)
        text = ""
        partial_reasked = False
        for ask in range(self.config.max_reasks):
            if should_cancel is not None and should_cancel():
                raise PlanCanceled(f"planning canceled after {report.asks} asks")
            report.asks += 1
            # The seed of a local model's sampling: fixed per cache key and ask, so an answer repeats.
            completion = self.client.complete(conversation, should_cancel=should_cancel, seed=int(key[-8:], 16) + ask,
                                              deadline=deadline)
            report.attempts += completion.record.attempts
            report.waits.extend(completion.record.waits)
            report.structured = completion.record.structured
            report.tokens += completion.record.tokens or 0
            text = completion.text
            try:
                layout = self._whole_layout(text, previous)
            except LayoutParseError as exc:
                error = str(exc)
                if completion.finish_reason == "length":
                    error += f" (the answer was cut at max_tokens={self.config.max_tokens})"
                elif completion.finish_reason == "time":
                    error += f" (the answer was cut at the time limit of {self.config.timeout_s:g} s)"
                report.parse_errors.append(error)
                conversation = conversation + _reply(text, f"That answer could not be used: {error}. Reply again with only the layout JSON.")
                continue
            missing = left_out(previous, layout, instruction) if previous is not None and instruction else []
            if missing and not partial_reasked and report.asks < self.config.max_reasks:
                partial_reasked = True
                names = ", ".join(f"{o.id!r} ({o.phrase})" for o in missing)
                report.parse_errors.append(f"the answer left out {names}, which the instruction does not mention")
                conversation = conversation + _reply(
                    text,
                    f"Your answer left out {names}, which the instruction does not mention. Answer with the whole "
                    "updated layout: every object of the previous layout stays, with its id, phrase and box, unless "
                    "the instruction changes or removes it.",
                )
                continue
            if self.cache is not None:
                self.cache.set(key, text)
            return self._keep_left_out(layout, previous, instruction), report
        raise LLMBadOutput(
            f"the LLM gave no usable layout in {report.asks} asks; last problem: {report.parse_errors[-1]}",
            asks=report.asks,
            last_text=text,
        )

    def _cached(self, key: str, previous: Layout | None) -> Layout | None:
        """The cached answer's layout; None when there is none or it no longer reads (then it is asked again and overwritten)."""
        if self.cache is None:
            return None
        cached = self.cache.get(key)
        if isinstance(cached, bytes):  # a Redis client without decode_responses
            cached = cached.decode("utf-8", errors="replace")
        if cached is None:
            return None
        try:
            return self._whole_layout(cached, previous)
        except LayoutParseError:
            return None  # a stale or foreign entry

    def _whole_layout(self, text: str, previous: Layout | None) -> Layout:
        """The layout of an answer; an answer cut mid-way is not one (its salvaged part lacks objects)."""
        layout = self._build(text, previous)
        if any(w.tag == "truncated" for w in layout.warnings):
            raise LayoutParseError("the answer stops mid-way, before the layout is complete; give a shorter answer")
        return layout

    def _keep_left_out(self, layout: Layout, previous: Layout | None, instruction: str | None) -> Layout:
        """A partial revision answer: the objects it left out (unnamed by the instruction) stay as they were."""
        missing = left_out(previous, layout, instruction) if previous is not None and instruction else []
        if not missing:
            return layout
        room = max(0, self.max_objects - len(layout.objects))
        warnings = layout.warnings + [
            LayoutWarning(tag="kept", text=f"{o.phrase!r} ({o.id}) unchanged: the LLM left it out although the instruction does not mention it")
            for o in missing[:room]
        ]
        if missing[room:]:
            warnings.append(LayoutWarning(tag="capped", text=f"could not keep {len(missing) - room} left-out object(s) within {self.max_objects}"))
        order = {o.id: index for index, o in enumerate(previous.objects)}
        objects = sorted(layout.objects + missing[:room], key=lambda o: order.get(o.id, len(order)))
        return layout.model_copy(update={"objects": objects, "warnings": bounded_warnings(warnings)})


def _reply(answer: str, feedback: str) -> list[dict[str, str]]:
    """The turns that show the model its unusable answer and what to do instead."""
    return [{"role": "assistant", "content": answer}, {"role": "user", "content": feedback}]
