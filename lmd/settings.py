"""The one settings object: every knob of the CLI, the API and the workers.

Environment variables carry the prefix ``LMD_`` (``LMD_REDIS_URL``...); an ``.env`` file in
the working directory is read too. ``OPENAI_API_KEY`` is honoured when ``LMD_LLM_API_KEY``
is unset. The stages never read this object: callers turn it into the stages' own typed
configs (``layout_planner.LLMConfig``, ``grounded_sd`` options), so the libraries stay usable
without environment variables.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from grounded_sd.names import Dtype, Preset, SamModelType, Variant
from layout_planner.layout import MAX_OBJECTS

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""An LMD_MODELS or LMD_LORAS name: safe in a Celery queue name, a URL and a log line."""

Segmenter = Literal["sam", "shapes"]
SEGMENTERS: tuple[str, ...] = get_args(Segmenter)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LMD_", env_file=".env", extra="ignore")

    # --- stage 1: the LLM layout planner -------------------------------------------------
    llm_base_url: str = Field("https://api.openai.com/v1", description="any OpenAI-compatible endpoint")
    llm_model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    llm_api_key: SecretStr | None = Field(None, description="API key; falls back to OPENAI_API_KEY")
    llm_mode: Literal["chat", "completions"] = Field("chat", description="completions for base models")
    llm_structured_output: Literal["auto", "json_schema", "off"] = Field(
        "auto", description="ask for a JSON-schema response format (auto: try, fall back to text)"
    )
    llm_temperature: float = Field(0.25, ge=0.0, le=2.0, description="sampling temperature (ref 0.25)")
    llm_max_tokens: int = Field(900, ge=16, le=32768, description="answer length cap (ref 900)")
    llm_timeout_s: float = Field(60.0, gt=0, description="per request")
    llm_max_attempts: int = Field(4, ge=1, le=10, description="transport attempts (errors, 429, 5xx) per call")
    llm_max_reasks: int = Field(3, ge=1, le=10, description="asks per layout when the answer does not parse")
    llm_backoff_s: float = Field(1.0, ge=0, description="first backoff; doubles each retry, with jitter")
    llm_max_retry_after_s: float = Field(60.0, ge=0, description="cap on an endpoint's Retry-After before a retry")
    llm_deadline_s: float = Field(
        240.0, gt=0, description="one planning call (all attempts and re-asks) ends llm_unavailable past this"
    )
    planner: Literal["auto", "remote", "local"] = Field(
        "auto", description="stage 1's LLM: remote (the LMD_LLM_* endpoint), local (LMD_LOCAL_LLM_MODEL in process), "
        "auto: remote when LMD_LLM_BASE_URL or a key is set, else local"
    )
    local_llm_model: str = Field(
        "Qwen/Qwen2.5-1.5B-Instruct", description="local planner: hub id (downloaded on first use) or directory of a chat model"
    )
    local_llm_device: str = Field("auto", description="local planner: auto (cuda when available), cpu, cuda, cuda:N")
    local_llm_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="local planner: auto: bf16 (fp16 without bf16) on CUDA, fp32 on CPU"
    )
    local_llm_max_new_tokens: int = Field(900, ge=16, le=32768, description="local planner: most tokens of one answer")
    local_llm_timeout_s: float = Field(120.0, gt=0, description="local planner: most seconds of one answer")

    # --- stage 2: the grounded diffusion controller ----------------------------------------
    sd_model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="hub id or local diffusers directory")
    models: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object, name -> hub id, diffusers directory or single .safetensors/.ckpt file, e.g. '
                    '{"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "/models/sd21"}: the models a request may '
                    'name (the first is the default; each has its render queue render.<name>); empty: LMD_SD_MODEL alone',
    )
    single_file_config: str | None = Field(
        None, description="where a single-file model's configs and tokenizer are: a local diffusers directory of the same "
                          "kind (SD 1.x, 2.x or an SDXL base) or a hub id; unset: diffusers' default repository for the kind found in the "
                          "file (from the hub cache when offline)",
    )
    worker_model: str | None = Field(
        None, description="the LMD_MODELS name a render worker loads (lmd worker --model sets it); unset: the first"
    )
    loras: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object, name -> LoRA .safetensors file (diffusers, PEFT or kohya/A1111 keys), e.g. '
                    '{"ink": "/loras/ink.safetensors"}: the adapters a request may name',
    )
    scheduler: str = Field("DDIMScheduler", description="any diffusers scheduler class name")
    sam_checkpoint: Path | None = Field(None, description="segment-anything checkpoint; unset: attention masks")
    sam_model_type: SamModelType = Field("vit_b", description="architecture of the SAM checkpoint (vit_b: the reference's)")
    segmenter: Segmenter = Field(
        "sam", description="what cuts each object's mask: sam (LMD_SAM_CHECKPOINT; unset: attention masks) or shapes "
                           "(the shapes world's exact colour segmenter, for models/shapes: docs/shapes.md)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Dtype = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; unset: torch's default")
    max_batch: int | None = Field(None, ge=1, description="most samples per UNet call in stage 2; unset: all objects x CFG in one call")
    guidance_checkpointing: bool = Field(
        False, description="recompute guidance's UNet blocks in its backward instead of keeping their activations (less memory per object, a few % more time)"
    )
    refiner: str | None = Field(
        None, description="SDXL refiner (hub id or local diffusers directory) that finishes every image; unset: none"
    )
    refiner_strength: float = Field(0.3, gt=0.0, le=1.0, description="fraction of the refiner's schedule redone (ref 0.3)")
    refiner_resolution: int = Field(1024, ge=64, le=4096, description="the refiner works at this long side in pixels (ref 1024)")
    preset: Preset = Field(
        "reference", description="stage 2 option preset of a service request that names none: reference (docs/method.md) or fast"
    )
    variant: Variant = Field(
        "lmd", description="method of a service request that names none: lmd, sd (plain baseline), lmd_plus (GLIGEN model)"
    )
    conditioning: str = Field(
        "clip",
        pattern=r"^(clip|ella|gluenet|connector:.+)$",
        description="text conditioning of the denoising of a request that names none: clip, ella, gluenet, connector:PATH (docs/conditioning.md, docs/training.md)",
    )
    ella_checkpoint: str = Field(
        "QQGYLab/ELLA/ella-sd1.5-tsc-t5xl.safetensors", description="ELLA's connector: a .safetensors file, or owner/repo/file on the hub"
    )
    ella_t5: str = Field("google/flan-t5-xl", description="ELLA's T5 encoder: hub id or local directory (fp16 on CUDA)")
    ella_negative: Literal["layout", "empty"] = Field(
        "layout",
        description="what ELLA encodes as the negative when a run names none: layout (the layout's negative prompt) or empty (\"\", as ELLA's official pipeline)",
    )
    gluenet_checkpoints: dict[str, str] = Field(
        default_factory=dict, description='JSON object, language -> GlueNet checkpoint file, e.g. {"zh": "/w/gluenet_Chinese_clip_overnorm_over3_noln.ckpt"}'
    )
    gluenet_xlmr: str = Field("FacebookAI/xlm-roberta-large", description="GlueNet's XLM-RoBERTa-large encoder: hub id or local directory")

    # --- service -------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="broker, results, records, LLM cache")
    data_dir: Path = Field(Path("./data"), description="images, masks and reports of jobs")
    retention_s: int = Field(7 * 24 * 3600, ge=60, description="how long job/session records and images are kept")
    api_keys: list[str] = Field(default_factory=list, description="JSON list; empty: no authentication")
    api_host: str = Field("127.0.0.1", description="address `lmd serve` binds")
    api_port: int = Field(8000, description="port `lmd serve` binds")
    cors_origins: list[str] = Field(
        default_factory=list, description='JSON list of origins whose pages may call the API (CORS), e.g. ["https://app.example"]; empty: CORS off'
    )
    api_header_timeout_s: float = Field(
        10.0, gt=0, description="`lmd serve` closes a connection whose request headers take longer (slow clients)"
    )
    api_body_timeout_s: float = Field(
        30.0, gt=0, description="a request whose body stalls longer between two reads is answered 408"
    )
    api_keep_alive_s: int = Field(5, ge=1, description="`lmd serve` closes an idle keep-alive connection after this")
    api_max_connections: int = Field(
        1000, ge=1, description="`lmd serve`: open connections and running requests per process; more are answered 503"
    )
    ops_keys: list[str] = Field(
        default_factory=list, description="JSON list of keys for /metrics and /readyz's worker details; empty: any LMD_API_KEYS key"
    )

    # --- limits (enforced at the API edge with 422) -----------------------------------------
    max_prompt_chars: int = Field(2000, description="longest prompt (422 above)")
    max_instruction_chars: int = Field(1000, description="longest multi-turn instruction (422 above)")
    max_objects: int = Field(MAX_OBJECTS, description="most objects in a layout (422 above)")
    max_steps: int = Field(150, description="most denoising steps a request may ask for")
    min_size: int = Field(64, description="smallest width/height in pixels (multiples of 8)")
    max_size: int = Field(1024, description="largest width/height in pixels (multiples of 8)")
    max_seed: int = Field(2**32 - 1, description="largest seed accepted")
    max_active_jobs: int = Field(1000, ge=1, description="unfinished jobs of all keys together; more -> 429")
    max_active_jobs_per_key: int = Field(100, ge=1, description="unfinished jobs of one API key; more -> 429")
    rate_limit_per_min: int = Field(120, ge=1, description="POST /generate and /instruct per API key per minute; more -> 429")
    max_turns: int = Field(50, ge=1, description="turns of one session; more -> 409 too_many_turns")
    max_streams_per_key: int = Field(20, ge=1, description="open GET /jobs/{id}/events streams per API key; more -> 429")
    failed_retention_s: int = Field(24 * 3600, ge=60, description="how long failed and canceled jobs are kept (at most LMD_RETENTION_S)")

    # --- workers -------------------------------------------------------------------------
    task_soft_time_limit_s: int = Field(600, description="a task past this ends failed (Celery soft limit)")
    task_time_limit_s: int = Field(660, description="hard limit: the worker process is killed and replaced")
    max_redeliveries: int = Field(2, description="re-runs of a job whose worker died; then failed with worker_lost")
    heartbeat_s: float = Field(5.0, gt=0, description="how often a running job's worker refreshes its heartbeat")
    worker_lost_after_s: float = Field(60.0, gt=0, description="a running job with an older heartbeat is re-enqueued")
    reaper_interval_s: float = Field(15.0, gt=0, description="how often each worker sweeps lost jobs and old images")
    worker_alive_file: Path | None = Field(
        None, description="a file each worker touches after each registration in Redis (every LMD_HEARTBEAT_S); "
                          "a container health check reads its age. Unset: none")
    redis_timeout_s: float = Field(2.0, gt=0, description="socket timeout of the service's Redis calls")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 when Redis is unreachable")
    events_poll_s: float = Field(0.5, gt=0, description="how often GET /jobs/{id}/events re-reads the job")

    @model_validator(mode="after")
    def _fallback_openai_key(self) -> "Settings":
        if self.llm_api_key is None and os.environ.get("OPENAI_API_KEY"):
            self.llm_api_key = SecretStr(os.environ["OPENAI_API_KEY"])
        if self.task_time_limit_s <= self.task_soft_time_limit_s:
            raise ValueError("LMD_TASK_TIME_LIMIT_S must be above LMD_TASK_SOFT_TIME_LIMIT_S")
        if self.min_size > self.max_size:
            raise ValueError("LMD_MIN_SIZE must not exceed LMD_MAX_SIZE")
        for setting, names in (("LMD_MODELS", self.models), ("LMD_LORAS", self.loras)):
            bad = [name for name in names if not NAME_PATTERN.fullmatch(name)]
            if bad:
                raise ValueError(f"{setting}: name {bad[0]!r} must be 1-64 letters, digits, '_', '-' or '.' (it names a queue)")
        if self.worker_model is not None and self.worker_model not in self.models:
            known = ", ".join(self.models) or "none: LMD_MODELS is empty"
            raise ValueError(f"LMD_WORKER_MODEL {self.worker_model!r} is not a name of LMD_MODELS ({known})")
        if self.segmenter == "shapes" and self.sam_checkpoint is not None:
            raise ValueError("LMD_SEGMENTER=shapes and LMD_SAM_CHECKPOINT are both set: choose one segmenter")
        if self.dtype == "float16" and self.device.strip().lower().startswith("cpu"):
            raise ValueError("LMD_DTYPE=float16 with LMD_DEVICE=cpu is refused (20-70x slower guidance); "
                             "use float32 or bfloat16")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process (the API's dependency and the workers' startup use this)."""
    return Settings()
