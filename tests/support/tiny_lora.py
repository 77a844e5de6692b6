"""Tiny random LoRA adapters for the tiny UNet, written as real LoRA files.

``build_tiny_lora`` adds a PEFT ``LoraConfig`` to the tiny model's UNet, draws its weights
(PEFT starts ``lora_B`` at zero, which would change nothing), and saves the adapter with
diffusers' own ``save_lora_weights`` (diffusers keys, ``unet.`` prefix). ``kohya=True`` writes
the same weights under kohya/A1111 names (``lora_unet_<path>.lora_down.weight``, ``.alpha``),
the format most shared SD 1.x LoRAs use, for diffusers' converter to read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

RANK = 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_state(model_dir: Path | str, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny UNet of ``model_dir``, in diffusers' key format (``unet.<path>.lora.up.weight``)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return StableDiffusionLoraLoaderMixin.pack_weights(layers, "unet")


def build_tiny_lora(model_dir: Path | str, path: Path | str, *, seed: int = 1, kohya: bool = False) -> Path:
    """Write a random LoRA for the tiny model's UNet to the file ``path`` (.safetensors)."""
    from safetensors.torch import save_file

    state = lora_state(model_dir, seed)
    if kohya:
        state = to_kohya(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers' LoRA keys as kohya's sd-scripts name them for SD 1.x (module path with '_', lora_down/up, alpha)."""
    kohya: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora.")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{kind.split('.')[0]}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(RANK))
    return kohya


@pytest.fixture(scope="session")
def tiny_loras(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random adapters (``ink``, ``paper``) for the tiny model, and ``ink`` again in kohya's format."""
    root = tmp_path_factory.mktemp("tiny_loras")
    return {
        "ink": build_tiny_lora(tiny_sd_path, root / "ink.safetensors", seed=1),
        "paper": build_tiny_lora(tiny_sd_path, root / "paper.safetensors", seed=2),
        "ink_kohya": build_tiny_lora(tiny_sd_path, root / "ink_kohya.safetensors", seed=1, kohya=True),
    }
