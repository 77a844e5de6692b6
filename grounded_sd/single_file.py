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
KINDS = {"v1": "SD 1.x", "v2": "SD 2.x", "xl_base": "SDXL"}
"""The model types (diffusers' names, found from the keys) that load as LMD's pipeline."""
UNET_PREFIX = "model.diffusion_model."
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
"""SD 2.x's OpenCLIP text encoder, as diffusers recognises it (``is_open_clip_model``)."""
SDXL_PREFIX = "conditioner.embedders."
"""Where SDXL's files keep their text encoders (SD 1.x and 2.x: ``cond_stage_model.``)."""
SDXL_BASE_KEYS = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
"""An SDXL *base* file's two encoders: CLIP ViT-L (Hugging Face's names), OpenCLIP ViT-bigG. The
refiner has only OpenCLIP's, as ``embedders.0.model.``."""
SDXL_REFINER_KEY = "conditioner.embedders.0.model."


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
    """``v1``, ``v2`` or ``xl_base`` (an SDXL base) from the checkpoint's keys; other kinds are refused.

    diffusers' rule (``infer_diffusers_model_type``), plus: a file whose text encoder is OpenCLIP's
    (``cond_stage_model.model.*``, SD 2.x's encoder) is ``v2`` whatever its width, and one with
    both of SDXL base's text encoders (``conditioner.embedders.0.transformer.*`` and
    ``conditioner.embedders.1.model.*``) is ``xl_base`` whatever its depth. diffusers tells SD 2 by
    its cross-attention width (1024) and SDXL by its OpenCLIP encoder's 10th layer, which a model of
    the same topology at another size (a distilled fine-tune, the tests' tiny models) lacks; the
    encoders' layout is what decides how their weights are read, and the default configs follow
    the kind. Any other ``conditioner.embedders.*`` file (the refiner's one encoder) is refused."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(key.startswith(UNET_PREFIX) for key in checkpoint):
        raise ModelLoadError(f"{name} is not a Stable Diffusion checkpoint in the original layout (no {UNET_PREFIX}* keys)")
    kind = infer_diffusers_model_type(checkpoint)
    if kind == "v1" and OPEN_CLIP_KEY in checkpoint:
        kind = "v2"
    if kind == "v1" and any(key.startswith(SDXL_PREFIX) for key in checkpoint):
        if all(any(key.startswith(prefix) for key in checkpoint) for prefix in SDXL_BASE_KEYS):
            kind = "xl_base"
        else:  # not SD 1.x, whatever diffusers' rule says of a small one
            kind = "xl_refiner" if any(key.startswith(SDXL_REFINER_KEY) for key in checkpoint) else "xl_incomplete"
    if kind not in KINDS:
        raise ModelLoadError(f"{name} is a {kind!r} checkpoint; single files load as SD 1.x, SD 2.x or an SDXL base only")
    return kind


def default_config(kind: str) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]


def check_config_at_hand(config: str, kind: str, name: str, setting: str) -> bool:
    """True when ``config`` is a local directory; for a hub id offline, its configs must be cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    from grounded_sd import sdxl

    directory = Path(config).expanduser()
    if directory.is_dir():
        for needed, what in ((("model_index.json", "unet/config.json", "tokenizer"), "a diffusers"),
                             (sdxl.PARTS if kind == "xl_base" else (), "an SDXL")):
            missing = [p for p in needed if not (directory / p).exists()]
            if missing:
                raise ModelLoadError(f"{setting} {config} is not {what} model directory: missing {', '.join(missing)}")
            if what == "a diffusers" and (kind == "xl_base") != sdxl.declares_sdxl(directory):
                declared = "SDXL" if sdxl.declares_sdxl(directory) else "SD 1.x/2.x"
                raise ModelLoadError(f"{name} is a {KINDS[kind]} checkpoint but {setting} {config} holds an {declared} "
                                     f"model's configs: set it to a local diffusers directory of a {KINDS[kind]} model")
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
    """(UNet, VAE, text encoder, tokenizer, scheduler, extra) of the checkpoint file ``path``;
    ``extra`` is SDXL's ``text_encoder_2`` and ``tokenizer_2`` (empty for SD 1.x/2.x), as
    ``LMDPipeline`` takes them from an SDXL directory.

    SDXL loads through ``StableDiffusionXLPipeline.from_single_file``, which reads both encoders:
    CLIP ViT-L from ``conditioner.embedders.0`` and OpenCLIP ViT-bigG (fused ``in_proj``,
    transposed ``text_projection``) from ``conditioner.embedders.1``; it picks each by its width
    (the position embedding's), so the two must differ, as in every SDXL (768 and 1280)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(str(path)).expanduser()
    kind = model_kind(read_checkpoint(path), path.name)
    config = str(config) if config else default_config(kind)
    local = check_config_at_hand(config, kind, path.name, setting)
    xl = kind == "xl_base"
    options = {"add_watermarker": False} if xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_single_file(
            str(path), config=config, torch_dtype=torch_dtype, local_files_only=local, **options
        )
    except Exception as exc:  # noqa: BLE001 - diffusers' converter fails on a partial or foreign file in many ways
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load {path.name} as {KINDS[kind]} with the configs of {config}: {first}") from exc
    extra = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2} if xl else {}
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, extra
