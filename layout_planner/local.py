"""The local planner: an open-weights chat model run in this process, decoding constrained to a layout.

``LocalLLMClient`` has the HTTP client's interface (``complete(messages) -> Completion``,
``close()``), so ``Planner`` keeps its template, parser, repair, cache, re-asks and
multi-turn revision whichever answers. The model (any transformers causal LM: a hub id or
a local directory) is loaded on first use, once per client, on the GPU in bf16/fp16 when
there is one, else on the CPU in fp32. Every token is drawn from those the layout grammar
allows (``llguidance``, from ``constrained_layout_schema``), so every complete answer parses;
``max_tokens``, ``timeout_s`` and a caller's ``should_cancel`` (checked between tokens) bound
each answer.

This module imports only pydantic at import time: torch, transformers and llguidance load
with the model, so the HTTP path never pays for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from layout_planner.client import CallRecord, Completion
from layout_planner.errors import LocalModelUnavailable, PlanCanceled
from layout_planner.hub_ids import is_hub_id  # noqa: F401  (re-exported)
from layout_planner.layout import MAX_OBJECTS
from layout_planner.template import completion_prompt, constrained_layout_schema

log = logging.getLogger(__name__)

# Apache-2.0, 1.5 B parameters (3.1 GB in bf16), follows JSON instructions well for its size (docs/planner.md).
DEFAULT_LOCAL_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
# What a download fetches: config, tokenizer, chat template, safetensors weights (never .bin, .gguf, .onnx).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# JSON as the template's examples write it (json.dumps' separators), no free whitespace, no escapes.
GRAMMAR_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "json_allowed_escapes": ""}


class LocalLLMConfig(BaseModel):
    """Which local model and how to run it. ``max_tokens``/``timeout_s`` bound one answer; ``mode`` keys the cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_LOCAL_MODEL, description="hub id or local directory of a transformers causal LM")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); None: the default branch")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    temperature: float = Field(0.25, ge=0.0, le=2.0, description="0: greedy decoding")
    max_tokens: int = Field(900, ge=16, description="most new tokens of one answer")
    timeout_s: float = Field(120.0, gt=0, description="most seconds of one answer's generation")
    max_reasks: int = Field(3, ge=1, le=10)
    max_prompt_chars: int = Field(2000, ge=1)
    mode: Literal["local"] = "local"


def resolve_model_dir(model: str, revision: str | None = None, say: Callable[[str], None] | None = None) -> Path:
    """The local directory holding ``model``: the directory itself, or the hub snapshot, downloaded
    on first use with a progress bar after a line giving its size. Raises ``LocalModelUnavailable``."""
    if not is_hub_id(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise LocalModelUnavailable(f"the local planner model directory {model} does not exist")
        if not (path / "config.json").is_file():
            raise LocalModelUnavailable(f"the local planner model directory {model} has no config.json")
        return path
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise LocalModelUnavailable(
            f"the local planner model {model} is not downloaded and the hub is offline (HF_HUB_OFFLINE)"
        )
    try:
        info = HfApi().model_info(model, revision=revision, files_metadata=True)
        from fnmatch import fnmatch

        size = sum(f.size or 0 for f in info.siblings or [] if any(fnmatch(f.rfilename, p) for p in MODEL_FILES))
        if say is not None:
            say(f"downloading the layout model {model} ({size / 1e9:.1f} GB) once into the Hugging Face cache "
                f"({constants.HF_HUB_CACHE})")
        return Path(snapshot_download(model, revision=revision, allow_patterns=MODEL_FILES))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LocalModelUnavailable(f"cannot download the local planner model {model}: {first}") from exc
    except Exception as exc:  # the hub client's transport errors (httpx's or httpx2's ConnectError, timeouts)
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise LocalModelUnavailable(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} to download the local planner model {model} ({first})"
        ) from exc


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    return device, getattr(torch, dtype)


class LocalLLMClient:
    """Answers a conversation with a local causal LM under the layout grammar; loads the model on first use.

    ``say``: told one line before a first download (its size) and when the model is loaded.
    """

    def __init__(self, config: LocalLLMConfig, max_objects: int = MAX_OBJECTS, say: Callable[[str], None] | None = None):
        self.config = config
        self.max_objects = max_objects
        self.say = say
        self._lock = threading.Lock()
        self._loaded = None  # (tokenizer, model, device, llguidance tokenizer, grammar) once loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def load(self) -> None:
        """Load (downloading first if needed) the model, tokenizer and grammar; a no-op once loaded."""
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()

    def _load(self):
        cfg = self.config
        directory = resolve_model_dir(cfg.model, cfg.revision, self.say)
        import llguidance
        import llguidance.hf
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device, dtype = _device_and_dtype(cfg.device, cfg.dtype)
        started = time.monotonic()
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LocalModelUnavailable(f"cannot load the local planner model {cfg.model}: {first}") from exc
        try:
            ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        except ValueError as exc:  # a slow (sentencepiece-only) tokenizer
            raise LocalModelUnavailable(f"the local planner model {cfg.model} needs a fast tokenizer (tokenizer.json): {exc}") from exc
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            constrained_layout_schema(self.max_objects), defaults=GRAMMAR_OPTIONS
        )
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
        if is_error:
            raise LocalModelUnavailable(f"the layout grammar does not compile for {cfg.model}: {messages[0]}")
        log.info("local planner %s loaded on %s (%s) in %.1f s", cfg.model, device, dtype, time.monotonic() - started)
        if self.say is not None:
            self.say(f"layout model {cfg.model} on {device} ({str(dtype).removeprefix('torch.')})")
        return tokenizer, model, device, ll_tokenizer, grammar

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation as token ids: the model's chat template, or the flat completion prompt of a base model."""
        self.load()
        tokenizer = self._loaded[0]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = completion_prompt(messages) + " "
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(
        self, messages: list[dict[str, str]], should_cancel: Callable[[], bool] | None = None, seed: int = 0,
        deadline: float | None = None,
    ) -> Completion:
        """One answer, constrained to the layout grammar. ``finish_reason``: ``stop`` (the JSON is
        complete), ``length`` (``max_tokens``) or ``time`` (``timeout_s``); ``PlanCanceled`` when
        ``should_cancel`` returned True (checked before each token). ``seed`` makes sampling repeatable.
        ``deadline`` is the remote client's call shape; a local answer is bounded by ``timeout_s``."""
        import llguidance
        import torch

        from layout_planner.constrained import Deadline, GrammarLogitsProcessor, StopWhen

        ids = self.prompt_ids(messages)
        tokenizer, model, device, ll_tokenizer, grammar = self._loaded
        cfg = self.config
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        grammar_mask = GrammarLogitsProcessor(matcher, prompt_length=len(ids))
        canceled = StopWhen(should_cancel or (lambda: False))
        deadline = Deadline(cfg.timeout_s)
        eos = ll_tokenizer.eos_token
        sampling = cfg.temperature > 0
        options = {"do_sample": sampling, "temperature": cfg.temperature if sampling else None,
                   "top_p": 1.0 if sampling else None, "top_k": None, "repetition_penalty": None}
        rng_devices = []  # the CUDA generator to fork, so that seeding here leaves the process's RNG as it was
        if device.startswith("cuda"):
            index = torch.device(device).index
            rng_devices = [index if index is not None else torch.cuda.current_device()]
        with self._lock, torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            output = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=cfg.max_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                logits_processor=[grammar_mask],
                stopping_criteria=[canceled, deadline],
                **options,
            )
        new = output[0, len(ids):].tolist()
        ended = bool(new) and new[-1] == eos
        if ended:
            new = new[:-1]
        if canceled.fired:
            raise PlanCanceled(f"planning canceled after {len(new)} tokens", tokens=len(new))
        if ended or matcher.is_stopped():
            reason = "stop"
        elif deadline.fired:
            reason = "time"
        else:
            reason = "length"
        text = tokenizer.decode(new, skip_special_tokens=True)
        record = CallRecord(attempts=1, structured=True, tokens=len(new))
        return Completion(text=text, finish_reason=reason, record=record)

    def close(self) -> None:
        """Drop the model (its memory goes back when the last reference goes)."""
        with self._lock:
            self._loaded = None
