"""Single-file Stable Diffusion checkpoints (.safetensors, .ckpt), as most shared fine-tunes come.

diffusers' ``from_single_file`` converts a checkpoint in the original (CompVis/Stability) layout
into diffusers' modules, but it needs the model's configs and tokenizer, which a single file
does not hold: from ``config`` (a local diffusers directory or a hub id), else from the hub
repository diffusers' default for the model type it finds in the file's keys. Offline, that
repository must be in the hub cache; this module says so in one line before diffusers would
try the network.

A ``.ckpt`` is a pickle: it is read with ``torch.load(weights_only=True)`` first, so a file
holding anything but tensors (code, arbitrary objects) is refused before any of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from grounded_sd.errors import ModelLoadError

SUFFIXES = (".safetensors", ".ckpt")
KINDS = {"v1": "SD 1.x", "v2": "SD 2.x"}
"""The model types (diffusers' names, found from the keys) that load as LMD's pipeline."""
UNET_PREFIX = "model.diffusion_model."
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
"""SD 2.x's OpenCLIP text encoder, as diffusers recognises it (``is_open_clip_model``)."""
SDXL_PREFIX = "conditioner.embedders."
"""Where SDXL's files keep their text encoders (SD 1.x and 2.x: ``cond_stage_model.``)."""


def is_single_file(source: str | Path) -> bool:
    path = Path(str(source)).expanduser()
    return path.is_file() and path.suffix in SUFFIXES


def read_checkpoint(path: Path) -> dict:
    """The file's tensors by name; a .ckpt that holds more than tensors is a :class:`ModelLoadError`."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ModelLoadError(f"{path.name} is not a readable .safetensors file: {str(exc).splitlines()[0]}") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        raise ModelLoadError(
            f"{path.name} is refused: a .ckpt is a pickle, and this one holds more than plain tensors (it could run "
            "code when loaded); convert it to .safetensors where you trust it"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the training checkpoints' wrapper
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path.name} holds no tensors by name")
    return state


def model_kind(checkpoint: dict, name: str) -> str:
    """``v1`` or ``v2`` from the checkpoint's keys; other kinds are refused.

    diffusers' rule (``infer_diffusers_model_type``), plus: a file whose text encoder is OpenCLIP's
    (``cond_stage_model.model.*``, SD 2.x's encoder) is ``v2`` whatever its width, and one with
    SDXL's text encoders (``conditioner.embedders.*``) is SDXL, so refused. diffusers
    tells SD 2 by its cross-attention width (1024), which a model of SD 2's topology at another
    width (a distilled fine-tune, the tests' tiny model) lacks; the encoder's layout is what
    decides how its weights are read, and the default configs follow the kind."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(key.startswith(UNET_PREFIX) for key in checkpoint):
        raise ModelLoadError(f"{name} is not a Stable Diffusion checkpoint in the original layout (no {UNET_PREFIX}* keys)")
    kind = infer_diffusers_model_type(checkpoint)
    if kind == "v1" and OPEN_CLIP_KEY in checkpoint:
        kind = "v2"
    if kind == "v1" and any(key.startswith(SDXL_PREFIX) for key in checkpoint):
        kind = "xl_base"  # diffusers reads SDXL from its 10th OpenCLIP layer; a smaller SDXL is still not SD 1.x
    if kind not in KINDS:
        raise ModelLoadError(f"{name} is a {kind!r} checkpoint; single files load as SD 1.x or SD 2.x only")
    return kind


def default_config(kind: str) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]


def check_config_at_hand(config: str, kind: str, name: str, setting: str) -> bool:
    """True when ``config`` is a local directory; for a hub id offline, its configs must be cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(config).expanduser().is_dir():
        missing = [p for p in ("model_index.json", "unet/config.json", "tokenizer") if not (Path(config).expanduser() / p).exists()]
        if missing:
            raise ModelLoadError(f"{setting} {config} is not a diffusers model directory: missing {', '.join(missing)}")
        return True
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(config, "model_index.json"), str):
        raise ModelLoadError(
            f"{name} is a {KINDS[kind]} checkpoint; loading it needs that model's configs and tokenizer, from {config} on "
            f"the hub, which is offline and not in the local cache: set {setting} to a local diffusers directory of a "
            f"{KINDS[kind]} model (only its .json and tokenizer files are read)"
        )
    return False


def load_single_file(path: str | Path, *, torch_dtype, config: str | None = None,
                     setting: str = "LMD_SINGLE_FILE_CONFIG"):
    """The UNet, VAE, text encoder, tokenizer and scheduler of the checkpoint file ``path``."""
    from diffusers import StableDiffusionPipeline

    path = Path(str(path)).expanduser()
    kind = model_kind(read_checkpoint(path), path.name)
    config = str(config) if config else default_config(kind)
    local = check_config_at_hand(config, kind, path.name, setting)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config, torch_dtype=torch_dtype, local_files_only=local, safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # noqa: BLE001 - diffusers' converter fails on a partial or foreign file in many ways
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load {path.name} as {KINDS[kind]} with the configs of {config}: {first}") from exc
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
