"""The typed configuration of ``lmd train-connector`` and its checks.

A YAML or TOML file with the sections below (every field has a default except the base
model, the encoders and the data); command-line flags override single fields. Everything a
user can get wrong is checked by :func:`check_setup` from configs and file listings alone,
before any weights load, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grounded_sd.conditioning.lidit import RefinerSize
from grounded_sd.conditioning.llm import EncoderSpec, check_encoder
from grounded_sd.conditioning.trained import ELLASize
from grounded_sd.errors import ConnectorError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConnectorSection(_Section):
    kind: Literal["lidit", "ella"] = Field(
        "lidit", description="lidit: an LI-DiT-style token refiner (docs/training.md); ella: ELLA's 64-query connector"
    )
    encoders: list[EncoderSpec] = Field(min_length=1, max_length=2, description="one language model, or two (lidit) to fuse")
    refiner: RefinerSize = RefinerSize()
    ella: ELLASize = ELLASize()
    guidance: Literal["tokens", "clip"] | None = Field(None, description="default: tokens for lidit, clip for ella")

    @model_validator(mode="after")
    def _kind_fits(self) -> "ConnectorSection":
        if self.kind == "ella" and len(self.encoders) != 1:
            raise ValueError("an ella connector takes exactly one text encoder (a T5)")
        if self.kind == "ella" and self.guidance == "tokens":
            raise ValueError("an ella connector has no token correspondence: guidance must be clip")
        return self

    @property
    def resolved_guidance(self) -> str:
        return self.guidance or ("tokens" if self.kind == "lidit" else "clip")


class DataSection(_Section):
    path: Path = Field(description="a folder of images with same-named .txt captions, or a JSONL of {image, caption}")
    resolution: int | None = Field(None, ge=8, description="square training size in pixels; default the UNet's native size")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by '' (for classifier-free guidance)")
    cache_features: bool = Field(False, description="encode every caption once, store the features on disk, free the language models")
    cache_dir: Path | None = Field(None, description="default <output_dir>/feature_cache")
    cache_latents: bool = Field(
        False, description="encode every image once with the VAE (its posterior's mean and std), store them in latent_cache/ beside the feature cache"
    )
    holdout: float = Field(
        0.0, ge=0, lt=1, description="share of the distinct captions held out of training for the validation loss (0: none)"
    )
    num_workers: int = Field(2, ge=0, le=64, description="data-loading processes per training process")


class OptimizerSection(_Section):
    name: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw: torch's AdamW; adamw8bit: bitsandbytes' 8-bit AdamW (less optimizer memory; needs bitsandbytes)"
    )
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(500, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null: off")


class TrainingSection(_Section):
    steps: int = Field(10000, ge=0, description="optimizer steps; 0 exports the untrained connector (a control for benchmarks)")
    batch_size: int = Field(8, ge=1, description="images per process per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="frozen UNet/VAE/LLM weights in this dtype; autocast for the connector")
    gradient_checkpointing: bool = Field(False, description="recompute UNet and refiner activations in the backward pass (less memory, ~30% slower)")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the connector (exported instead of the raw weights)")
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1, description="steps between log.jsonl lines (and tracker points)")
    snr_gamma: float | None = Field(
        None, gt=0, description="min-SNR loss weighting with this gamma (Hang et al. 2023 use 5); null: every timestep weighs 1"
    )
    latents: Literal["sample", "mean"] = Field(
        "sample", description="what the VAE's posterior gives each step: a sample (diffusers' scripts) or its mean (for a UNet trained on means)"
    )
    noise_offset: float = Field(0.0, ge=0, le=1, description="add offset x N(0, 1) per image and channel to the noise (offset noise); 0: off")
    tracker: Literal["auto", "tensorboard", "wandb", "none"] = Field(
        "auto", description="auto: TensorBoard when installed, else none; log.jsonl is written either way"
    )


class ValidationSection(_Section):
    every: int = Field(1000, ge=1, description="steps between validation image sets (and one at the end)")
    prompts: list[str] = Field(
        default_factory=lambda: ["a red apple on the left and a blue ball on the right", "two cats on a sofa"], max_length=64
    )
    seeds: list[int] = Field(default_factory=lambda: [0])
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=1)
    loss_timesteps: int = Field(4, ge=1, le=100, description="fixed timesteps per held-out image in the validation loss")


class TrainConfig(_Section):
    """The whole of a training run."""

    base_model: str = Field(description="SD 1.x or SDXL: hub id or local diffusers directory (unet/, vae/, scheduler/ are read)")
    connector: ConnectorSection
    data: DataSection
    optimizer: OptimizerSection = OptimizerSection()
    training: TrainingSection = TrainingSection()
    validation: ValidationSection = ValidationSection()
    output_dir: Path = Path("connector-run")

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir or self.output_dir / "feature_cache"

    @property
    def latent_cache_dir(self) -> Path:
        """Beside the feature cache: ``<output_dir>/latent_cache``, or next to ``data.cache_dir``."""
        return self.cache_dir.parent / "latent_cache"


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConnectorError(f"config: {key}: {part} is not a section")
    node[parts[-1]] = value


def read_config_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConnectorError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConnectorError(f"config {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConnectorError(f"config {path}: expected a mapping of sections at the top level")
    return data


def build_config(file: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The file's values, then ``overrides`` (dotted keys such as ``training.steps``)."""
    data = read_config_file(file) if file else {}
    base = file.parent if file else Path.cwd()
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise ConnectorError(f"config: {where}: {first['msg']}") from None
    if file and not config.data.path.is_absolute() and "data.path" not in {k for k, v in overrides.items() if v is not None}:
        config.data.path = base / config.data.path  # relative to the config file
    return config


@dataclass(frozen=True)
class BaseModelInfo:
    """What training needs to know about the base model, read from its configs."""

    source: str
    cross_attention_dim: int
    pooled_dim: int | None  # SDXL: the pooled text embedding's width
    resolution: int  # native size in pixels
    multiple: int  # sizes must be multiples of this
    prediction_type: str

    @property
    def sdxl(self) -> bool:
        return self.pooled_dim is not None


def inspect_base_model(source: str) -> BaseModelInfo:
    """Read the UNet, VAE and scheduler configs (no weights); a clear error when the model
    is unknown or not a Stable Diffusion UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ConnectorError(f"unknown base model {source!r}: no such directory")
        missing = [p for p in ("unet", "vae", "scheduler") if not (local / p).is_dir()]
        if missing:
            raise ConnectorError(f"base model {source!r} is not a diffusers Stable Diffusion directory: missing {', '.join(m + '/' for m in missing)}")
        source = str(local)
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae = AutoencoderKL.load_config(source, subfolder="vae")
        scheduler = DDPMScheduler.load_config(source, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise ConnectorError(f"unknown base model {source!r}: {str(exc).splitlines()[0]}") from None
    cross = unet.get("cross_attention_dim")
    if not isinstance(cross, int):
        raise ConnectorError(f"base model {source!r}: the UNet has no single cross_attention_dim ({cross!r}); SD 1.x/2.x or SDXL UNets only")
    pooled = None
    if unet.get("addition_embed_type") == "text_time":
        pooled = int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])
    elif unet.get("addition_embed_type") is not None:
        raise ConnectorError(f"base model {source!r}: addition_embed_type {unet['addition_embed_type']!r} is not supported (SD 1.x/2.x or SDXL)")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    multiple = vae_scale * 2 ** (len(unet.get("down_block_types", [])) - 1)
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return BaseModelInfo(source, cross, pooled, int(sample) * vae_scale, multiple, scheduler.get("prediction_type", "epsilon"))


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def list_examples(path: Path) -> list[Example]:
    """(image, caption) pairs of a folder (``x.png`` + ``x.txt``) or a JSONL file
    (``{"image": ..., "caption": ...}`` per line, image paths relative to the file)."""
    if not path.exists():
        raise ConnectorError(f"data: {path} does not exist")
    examples: list[Example] = []
    if path.is_dir():
        for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                raise ConnectorError(f"data: {image} has no caption file {caption_file.name}")
            caption = caption_file.read_text(encoding="utf-8").strip()
            if not caption:
                raise ConnectorError(f"data: caption file {caption_file} is empty")
            examples.append(Example(image, caption))
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, caption = row["image"], row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConnectorError(f"data: {path} line {number}: expected a JSON object with 'image' and 'caption'") from None
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            if not image_path.is_file():
                raise ConnectorError(f"data: {path} line {number}: image {image} not found")
            if not isinstance(caption, str) or not caption.strip():
                raise ConnectorError(f"data: {path} line {number}: empty caption")
            examples.append(Example(image_path, caption.strip()))
    if not examples:
        raise ConnectorError(f"data: no images with captions in {path}")
    return examples


def split_holdout(examples: list[Example], share: float) -> tuple[list[Example], list[Example]]:
    """(training, held out): the held-out captions are the ``share`` of distinct captions whose
    SHA-256 comes first, so the split depends on the captions only (not on file order or the
    seed) and a caption is never on both sides."""
    if share == 0:
        return examples, []
    captions = sorted({e.caption for e in examples}, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    count = math.ceil(share * len(captions))
    if count >= len(captions):
        raise ConnectorError(f"data.holdout {share} holds out all {len(captions)} distinct captions; lower it or add captions")
    held = set(captions[:count])
    return [e for e in examples if e.caption not in held], [e for e in examples if e.caption in held]


def resolve_tracker(name: str) -> str | None:
    """The accelerate tracker to log to, or None (log.jsonl only); an explicit tracker whose
    package is missing is an error. W&B logs to a remote service, so it is never chosen by auto."""
    installed = {package: importlib.util.find_spec(package) is not None for package in ("tensorboard", "wandb")}
    if name == "auto":
        return "tensorboard" if installed["tensorboard"] else None
    if name == "none":
        return None
    if not installed[name]:
        raise ConnectorError(f"training.tracker {name}: the {name} package is not installed (pip install {name}), or use tracker auto or none")
    return name


def check_optimizer(name: str) -> None:
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConnectorError(
            "optimizer.name adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes), or use optimizer.name adamw"
        )


@dataclass(frozen=True)
class Setup:
    """The checked configuration: the base model's facts, the encoders' widths, the training
    examples and the held-out ones (validation loss)."""

    config: TrainConfig
    base: BaseModelInfo
    in_dims: list[int]
    examples: list[Example]
    held_out: list[Example] = field(default_factory=list)
    tracker: str | None = None

    @property
    def resolution(self) -> int:
        return self.config.data.resolution or self.base.resolution


def check_setup(config: TrainConfig) -> Setup:
    """Everything that can be checked without loading weights, in the order a user fixes it."""
    base = inspect_base_model(config.base_model)
    resolution = config.data.resolution or base.resolution
    if resolution % base.multiple:
        raise ConnectorError(
            f"data.resolution {resolution} does not fit the base model: it must be a multiple of {base.multiple} "
            f"(VAE downsampling x UNet levels)"
        )
    in_dims = []
    for spec in config.connector.encoders:
        kind, hidden, _ = check_encoder(spec)
        if config.connector.kind == "ella" and kind != "t5":
            raise ConnectorError(f"an ella connector reads a T5 encoder; {spec.model!r} is a decoder-only LLM (use kind lidit)")
        in_dims.append(hidden)
    refiner = config.connector.refiner
    if config.connector.kind == "lidit":
        for spec, hidden in zip(config.connector.encoders, in_dims):
            width = refiner.width or hidden
            heads = refiner.heads or max(1, width // 64)
            if width % heads:
                raise ConnectorError(f"connector.refiner: width {width} ({spec.model}) is not divisible by {heads} heads")
    elif base.cross_attention_dim % config.connector.ella.heads:
        raise ConnectorError(
            f"connector.ella: the UNet's cross-attention width {base.cross_attention_dim} is not divisible by {config.connector.ella.heads} heads"
        )
    check_optimizer(config.optimizer.name)
    tracker = resolve_tracker(config.training.tracker)
    examples, held_out = split_holdout(list_examples(config.data.path), config.data.holdout)
    return Setup(config, base, in_dims, examples, held_out, tracker)
