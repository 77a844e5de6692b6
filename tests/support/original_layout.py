"""Write a diffusers Stable Diffusion directory as one checkpoint file in the original layout.

Shared fine-tunes come as one ``.safetensors`` in the layout of the CompVis/Stability code
(``ldm``) that A1111 and ComfyUI use: the UNet under ``model.diffusion_model.`` (``input_blocks``,
``middle_block``, ``output_blocks``), the VAE under ``first_stage_model.`` (``encoder.down``,
``decoder.up`` counted from the lowest resolution) and the text encoder under
``cond_stage_model.``: Hugging Face CLIP's own names under ``transformer.`` for SD 1.x, OpenCLIP's
names under ``model.`` for SD 2.x (one fused ``in_proj`` per attention, ``resblocks``, ``ln_1``...).
SDXL's files (Stability's ``sgm`` code) keep their two text encoders under ``conditioner.embedders.``:
CLIP ViT-L under ``0.transformer.`` (Hugging Face's names) and OpenCLIP ViT-bigG under ``1.model.``
(OpenCLIP's names, with its ``text_projection`` a matrix the pooled output is multiplied by on the
right, so the transpose of the ``nn.Linear`` weight of diffusers' ``CLIPTextModelWithProjection``);
the UNet's added-condition embedding is ``label_emb.0.0``/``label_emb.0.2``.
diffusers converts that layout to its own (``diffusers.loaders.single_file_utils``) but has no
converter back, and no such file can be downloaded here, so the single-file tests make one from
the tiny random models with this module.

Every key of the diffusers modules is mapped by rule from the UNet's config (``layers_per_block``,
which blocks have attentions) and a key no rule covers is an error, never a silent drop: a
mapping mistake shows as a weight that differs after diffusers converts the file back, which is
what the tests compare. The rules are the inverse of the facts in diffusers' converter (its
``DIFFUSERS_TO_LDM_MAPPING`` and ``convert_ldm_*`` functions), written out here by block position.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

TextLayout = Literal["clip", "open_clip", "sdxl"]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                   ("self_attn.out_proj", "attn.out_proj"))


class UnmappedKey(ValueError):
    """A diffusers key that no rule of the original layout covers (another architecture)."""


def _split(key: str, pattern: str) -> tuple[re.Match, str]:
    match = re.match(pattern, key)
    if not match:
        raise UnmappedKey(key)
    return match, key[match.end():]


def _resnet(rest: str) -> str:
    for new, old in UNET_RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise UnmappedKey(rest)


def unet_key(key: str, config) -> str:
    """The original name of the UNet parameter ``key`` (diffusers' name).

    The original UNet numbers its blocks in one sequence per side: ``input_blocks.0`` is conv_in,
    then each level's ``layers_per_block`` blocks (``.0`` its resnet, ``.1`` its attention) and a
    downsampler (``.0.op``) except on the last level; ``middle_block`` is resnet, attention,
    resnet; ``output_blocks`` has ``layers_per_block + 1`` blocks per level, the last of a level
    carrying the upsampler after the resnet and the attention (``.1.conv`` or ``.2.conv``)."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise UnmappedKey(f"{key}: layers_per_block per level ({per}) has no original layout")
    for new, old in UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if key.startswith("down_blocks."):
        match, rest = _split(key, r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
        level, part, index = int(match[1]), match[2], int(match[3])
        if part == "downsamplers":
            if not rest.startswith("conv."):
                raise UnmappedKey(key)
            return f"input_blocks.{1 + level * (per + 1) + per}.0.op.{rest[len('conv.'):]}"
        block = 1 + level * (per + 1) + index
        return f"input_blocks.{block}.0.{_resnet(rest)}" if part == "resnets" else f"input_blocks.{block}.1.{rest}"
    if key.startswith("mid_block."):
        match, rest = _split(key, r"mid_block\.(resnets|attentions)\.(\d+)\.")
        if match[1] == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(match[2])}.{_resnet(rest)}"
    if key.startswith("up_blocks."):
        match, rest = _split(key, r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")
        level, part, index = int(match[1]), match[2], int(match[3])
        if part == "upsamplers":
            after = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            return f"output_blocks.{level * (per + 1) + per}.{after}.{rest}"
        block = level * (per + 1) + index
        return f"output_blocks.{block}.0.{_resnet(rest)}" if part == "resnets" else f"output_blocks.{block}.1.{rest}"
    raise UnmappedKey(key)


def vae_key(key: str, config) -> str:
    """The original name of the VAE parameter ``key``; the decoder's levels count from the lowest
    resolution in the original (``decoder.up.0`` is diffusers' last ``up_blocks``)."""
    levels = len(config["up_block_types"])
    for new, old in (("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")):
        if key.startswith(new):
            return old + key[len(new):]
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|(post_)?quant_conv\.", key):
        return key
    match = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.", key)
    if match:
        side, part, index, rest = match[1], match[2], int(match[3]), key[match.end():]
        if part == "resnets":
            return f"{side}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        for new, old in VAE_ATTENTION.items():
            if rest.startswith(new + "."):
                return f"{side}.mid.attn_1.{old}{rest[len(new):]}"
        raise UnmappedKey(key)
    match = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.", key)
    if match:
        rest = key[match.end():]
        if match[3] is None:
            return f"encoder.down.{match[1]}.downsample.{rest}"
        return f"encoder.down.{match[1]}.block.{match[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    match = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.", key)
    if match:
        rest, level = key[match.end():], levels - 1 - int(match[1])
        if match[3] is None:
            return f"decoder.up.{level}.upsample.{rest}"
        return f"decoder.up.{level}.block.{match[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    raise UnmappedKey(key)


def open_clip_state(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text weights (keys without ``text_model.``) under OpenCLIP's names: the
    three attention projections fused into ``in_proj_weight``/``in_proj_bias`` (q, k, v rows)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in text.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key[len("final_layer_norm."):]] = tensor
        elif key.startswith("encoder.layers."):
            match = re.match(r"encoder\.layers\.(\d+)\.", key)
            layer, rest = match[1], key[match.end():]
            if re.match(r"self_attn\.[qkv]_proj\.", rest):
                kind = rest.rsplit(".", 1)[1]  # weight or bias, fused once from q, k and v
                if rest.startswith("self_attn.q_proj."):
                    parts = [text[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
                continue
            for new, old in OPEN_CLIP_LAYER:
                if rest.startswith(new + "."):
                    out[f"transformer.resblocks.{layer}.{old}{rest[len(new):]}"] = tensor
                    break
            else:
                raise UnmappedKey(key)
        elif key != "embeddings.position_ids":
            raise UnmappedKey(key)
    return out


def sdxl_text_state(text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """SDXL's two text encoders under ``conditioner.embedders.``: the first (``CLIPTextModel``) with
    Hugging Face's names, the second (``CLIPTextModelWithProjection``) with OpenCLIP's, its
    projection stored as OpenCLIP multiplies by it, ``pooled @ text_projection`` (width x
    projection): the transpose of diffusers' ``text_projection.weight``."""
    state = {SDXL_CLIP + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    second = text_encoder_2.state_dict()
    projection = second.pop("text_projection.weight")
    state.update({SDXL_OPEN_CLIP + k: v for k, v in open_clip_state({k.removeprefix("text_model."): v for k, v in second.items()}).items()})
    state[SDXL_OPEN_CLIP + "text_projection"] = projection.T
    return state


def original_state_dict(unet, vae, text_encoder, text_layout: TextLayout = "clip", text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The modules' weights under the original names (contiguous copies, ready to save);
    ``text_encoder_2``: SDXL's second encoder, with ``text_layout="sdxl"`` only."""
    if (text_layout == "sdxl") != (text_encoder_2 is not None):
        raise ValueError("text_encoder_2 goes with text_layout='sdxl', and only with it")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        state[UNET + unet_key(key, unet.config)] = tensor
    for key, tensor in vae.state_dict().items():
        if re.search(r"mid_block\.attentions\.0\.(to_[qkv]|to_out\.0)\.weight$", key):
            tensor = tensor[:, :, None, None]  # the original VAE attention's projections are 1x1 convolutions
        state[VAE + vae_key(key, vae.config)] = tensor
    text = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    if text_layout == "clip":
        state.update({CLIP + "text_model." + k: v for k, v in text.items()})
    elif text_layout == "open_clip":
        state.update({OPEN_CLIP + k: v for k, v in open_clip_state(text).items()})
    elif text_layout == "sdxl":
        state.update(sdxl_text_state(text_encoder, text_encoder_2))
    else:
        raise ValueError(f"unknown text layout {text_layout!r}")
    return {key: tensor.detach().contiguous().clone() for key, tensor in state.items()}


def write_single_file(model_dir: Path | str, out: Path | str, *, text_layout: TextLayout = "clip") -> Path:
    """Write the diffusers SD directory ``model_dir`` (unet/, vae/, text_encoder/, and for
    ``text_layout="sdxl"`` text_encoder_2/) as the single checkpoint ``out``: a ``.safetensors``,
    or a ``.ckpt`` (a pickle of ``{"state_dict": ...}``, tensors only, as training checkpoints are saved)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_dir, out = Path(model_dir), Path(out)
    second = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2") if text_layout == "sdxl" else None
    state = original_state_dict(
        UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"),
        AutoencoderKL.from_pretrained(model_dir, subfolder="vae"),
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"),
        text_layout,
        second,
    )
    if out.suffix == ".safetensors":
        save_file(state, str(out))
    elif out.suffix == ".ckpt":
        torch.save({"state_dict": state}, out)
    else:
        raise ValueError(f"{out.name}: write .safetensors or .ckpt")
    return out
