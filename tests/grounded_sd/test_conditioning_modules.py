"""ELLA's connector and GlueNet: the released files' key names and shapes (checked at full size
on the meta device, no memory), strict loading, and what each computes on tiny encoders."""

from __future__ import annotations

import pickle

import pytest
import torch

from grounded_sd.conditioning import ClipEmbeddings, TextInputs
from grounded_sd.conditioning.checkpoints import read_tensor_pickle
from grounded_sd.conditioning.ella import ELLA, ELLAConditioning, ELLAConfig
from grounded_sd.conditioning.gluenet import OUTPUT_NORMS, GlueNet, GlueNetConditioning, GlueNetConfig
from grounded_sd.conditioning.random_encoders import tiny_ella_config, tiny_gluenet_config
from grounded_sd.errors import CheckpointMismatch, ConditioningUnavailable


def expected_ella_keys() -> dict[str, tuple[int, ...]]:
    """``ella-sd1.5-tsc-t5xl.safetensors``, written out from the published architecture."""
    keys = {
        "time_embedding.linear_1.weight": (768, 320), "time_embedding.linear_1.bias": (768,),
        "time_embedding.linear_2.weight": (768, 768), "time_embedding.linear_2.bias": (768,),
        "connector.latents": (64, 768),
        "connector.time_aware_linear.weight": (768, 768), "connector.time_aware_linear.bias": (768,),
        "connector.proj_in.weight": (768, 2048), "connector.proj_in.bias": (768,),
    }
    for i in range(6):
        p = f"connector.perceiver_blocks.{i}"
        keys |= {
            f"{p}.attn.in_proj_weight": (2304, 768), f"{p}.attn.in_proj_bias": (2304,),
            f"{p}.attn.out_proj.weight": (768, 768), f"{p}.attn.out_proj.bias": (768,),
            f"{p}.mlp.c_fc.weight": (3072, 768), f"{p}.mlp.c_fc.bias": (3072,),
            f"{p}.mlp.c_proj.weight": (768, 3072), f"{p}.mlp.c_proj.bias": (768,),
        }
        for norm in ("ln_1", "ln_2", "ln_ff"):
            keys |= {f"{p}.{norm}.linear.weight": (1536, 768), f"{p}.{norm}.linear.bias": (1536,)}
    return keys


def expected_gluenet_keys() -> dict[str, tuple[int, ...]]:
    """``gluenet_{Lang}_clip_overnorm_over3_noln.ckpt``: 5 normed blocks and a tail without norms."""
    keys: dict[str, tuple[int, ...]] = {}

    def mlp(prefix: str, sizes: tuple[int, ...], linear_at: tuple[int, ...], norm_at: tuple[int, ...]) -> None:
        for index, (a, b) in zip(linear_at, zip(sizes[:-1], sizes[1:])):
            keys[f"{prefix}.{index}.weight"], keys[f"{prefix}.{index}.bias"] = (b, a), (b,)
        for index, b in zip(norm_at, sizes[1:]):
            keys[f"{prefix}.{index}.weight"], keys[f"{prefix}.{index}.bias"] = (b,), (b,)

    for i in range(5):
        mlp(f"blocks.{i}.net_tok", (77, 154, 154, 77), (0, 3, 6), (1, 4, 7))
        mlp(f"blocks.{i}.net_sen", (1024, 2048, 2048, 1024), (0, 3, 6), (1, 4, 7))
    mlp("tail.net_tok", (77, 154, 154, 77), (0, 2, 4), ())
    mlp("tail.net_sen", (1024, 2048, 2048, 768), (0, 2, 4), ())
    return keys


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_full_size_ella_has_the_released_keys_shapes_and_size():
    with torch.device("meta"):
        module = ELLA(ELLAConfig())
    assert _shapes(module) == expected_ella_keys()
    assert len(module.state_dict()) == 93
    assert sum(p.numel() for p in module.parameters()) == 66_820_608  # 66.8 M


def test_fresh_ella_starts_with_zero_timestep_modulation_as_the_official_init():
    """The official AdaLayerNorm zero-initialises its linear layer: a fresh perceiver block
    normalises without any timestep scale or shift (the issue measured ~21,300 for the abs-sum
    of one block's ln_1.linear.weight under PyTorch's default init)."""
    torch.manual_seed(0)
    module = ELLA(ELLAConfig(time_channels=32, time_embed_dim=64, width=64, text_dim=48, num_latents=8, layers=3, heads=4))
    modulations = {k: v for k, v in module.state_dict().items() if ".ln_" in k and ".linear." in k}
    assert len(modulations) == 3 * 3 * 2  # ln_1, ln_2, ln_ff per block, weight and bias
    assert all(float(v.abs().sum()) == 0.0 for v in modulations.values())
    # ... so every timestep-modulated norm is the plain LayerNorm, whatever the timestep
    block = module.connector.perceiver_blocks[0]
    x, temb = torch.randn(2, 5, 64), torch.randn(2, 1, 64) * 10
    plain = torch.nn.functional.layer_norm(x, (64,), eps=1e-6)
    for norm in (block.ln_1, block.ln_2, block.ln_ff):
        assert torch.equal(norm(x, temb), plain)
    # the rest keeps PyTorch's default init (as the official module does): it is not all zero
    assert float(module.connector.proj_in.weight.abs().sum()) > 0
    assert float(block.attn.in_proj_weight.abs().sum()) > 0


def test_full_size_gluenet_has_the_released_keys_shapes_and_size():
    with torch.device("meta"):
        module = GlueNet(GlueNetConfig())
    assert _shapes(module) == expected_gluenet_keys()
    assert round(sum(p.numel() for p in module.parameters()) / 1e6, 1) == 50.2
    assert len(OUTPUT_NORMS) == 77 and OUTPUT_NORMS[0] == 43.8203 and OUTPUT_NORMS[-1] == 28.3191


def test_configs_read_from_the_released_shapes():
    with torch.device("meta"):
        assert ELLAConfig.from_state(ELLA().state_dict()) == ELLAConfig()
        assert GlueNetConfig.from_state(GlueNet().state_dict()) == GlueNetConfig()


# --- strict loading ---------------------------------------------------------------------------
def test_tiny_files_load_strictly(tiny_conditioning_files):
    ella = ELLA.from_file(tiny_conditioning_files["ella"], config=tiny_ella_config(32, 32))
    gluenet = GlueNet.from_file(tiny_conditioning_files["gluenet_fr"], config=tiny_gluenet_config(32, 32))
    assert ella.config.num_latents == 8 and gluenet.config.depth == 2
    assert ELLA.from_file(tiny_conditioning_files["ella"]).config == tiny_ella_config(32, 32)  # sizes read from the file


def test_missing_and_renamed_keys_are_named(tiny_conditioning_files, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_conditioning_files["ella"]))
    missing = dict(state)
    del missing["connector.perceiver_blocks.1.ln_ff.linear.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"missing key 'connector\.perceiver_blocks\.1\.ln_ff\.linear\.bias'"):
        ELLA.from_file(tmp_path / "missing.safetensors", config=tiny_ella_config(32, 32))

    glue = torch.load(tiny_conditioning_files["gluenet_fr"], weights_only=True)
    glue["tail.net_sen.5.weight"] = glue.pop("tail.net_sen.4.weight")  # a renamed key
    torch.save(glue, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointMismatch, match=r"missing key 'tail\.net_sen\.4\.weight'.*unexpected key 'tail\.net_sen\.5\.weight'"):
        GlueNet.from_file(tmp_path / "renamed.ckpt", config=tiny_gluenet_config(32, 32))


def test_wrong_shape_is_named(tiny_conditioning_files):
    from dataclasses import replace

    wider = replace(tiny_ella_config(32, 32), num_latents=16)
    with pytest.raises(CheckpointMismatch, match=r"key 'connector\.latents' has shape \(8, 32\), expected \(16, 32\)"):
        ELLA.from_file(tiny_conditioning_files["ella"], config=wider)


class _Payload:
    """Any object other than tensors: a pickle holding it must not be unpickled."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_more_than_tensors_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"blocks.0.net_tok.0.weight": _Payload()}, handle)
    with pytest.raises(CheckpointMismatch, match="more than plain tensors; refused"):
        read_tensor_pickle(path)
    assert "must never run" not in capsys.readouterr().out
    torch.save({"weights": {"nested": torch.zeros(1)}}, tmp_path / "nested.ckpt")
    with pytest.raises(CheckpointMismatch, match="entry 'weights' is a dict, not a tensor"):
        read_tensor_pickle(tmp_path / "nested.ckpt")


def test_missing_files_name_the_setting(tmp_path, tiny_conditioning_files):
    with pytest.raises(ConditioningUnavailable, match=r"LMD_ELLA_CHECKPOINT: .*nope\.safetensors is not a file"):
        ELLAConditioning.from_pretrained(tmp_path / "nope.safetensors", tiny_conditioning_files["t5"])
    with pytest.raises(ConditioningUnavailable, match=r"LMD_ELLA_T5: the t5 encoder directory .*no-t5 does not exist"):
        ELLAConditioning.from_pretrained(tiny_conditioning_files["ella"], tmp_path / "no-t5")


# --- what they compute ------------------------------------------------------------------------
def _clip(rows: int = 2) -> ClipEmbeddings:
    g = torch.Generator().manual_seed(0)
    return ClipEmbeddings(*(torch.randn(n, 77, 32, generator=g) for n in (1, 1, rows, 1)))


TEXTS = TextInputs("a park with a red cat and a dog", ("a park with a red cat", "a park with a dog"), "blurry", "duplicate")


@pytest.fixture(scope="module")
def ella(tiny_conditioning_files) -> ELLAConditioning:
    torch.set_num_threads(1)
    return ELLAConditioning.from_pretrained(tiny_conditioning_files["ella"], tiny_conditioning_files["t5"])


def test_ella_depends_on_the_timestep_and_runs_once_per_step(ella):
    conditioned = ella.prepare(TEXTS, _clip())
    late, early = conditioned.denoising("final", 981), conditioned.denoising("final", 21)
    assert late[0].shape == (1, 8, 32) and late[1].shape == (1, 8, 32)
    assert (late[0] - early[0]).abs().mean() > 1e-3  # another timestep, other tokens
    calls = conditioned.connector_calls
    for _ in range(5):  # every guided forward and the CFG forward of one step ask again
        assert torch.equal(conditioned.denoising("final", 21)[0], early[0])
    assert conditioned.connector_calls == calls
    boxes = conditioned.denoising("per_box", 21)
    assert boxes[0].shape == (2, 8, 32) and not torch.equal(boxes[0][0], boxes[0][1])


def test_ella_replace_guides_on_clip_and_concat_prepends(ella):
    clip = _clip()
    replace = ella.prepare(TEXTS, clip)
    assert replace.token_offset == 0 and torch.equal(replace.guidance("final", 501), clip.scene)
    concat = ella.prepare(TEXTS, clip, mode="concat")
    cond, uncond = concat.denoising("per_box", 501)
    assert concat.token_offset == 8 and cond.shape == (2, 8 + 77, 32) and uncond.shape == (1, 85, 32)
    assert torch.equal(cond[:, 8:], clip.boxes) and torch.equal(concat.guidance("per_box", 501), cond)
    assert torch.equal(cond[:, :8], replace.denoising("per_box", 501)[0])


def test_ella_refuses_unets_it_has_no_weights_for(ella):
    from types import SimpleNamespace

    ella.check_unet(SimpleNamespace(config=SimpleNamespace(cross_attention_dim=32, addition_embed_type=None)))
    with pytest.raises(ConditioningUnavailable, match="cross_attention_dim is 1024"):
        ella.check_unet(SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024, addition_embed_type=None)))
    with pytest.raises(ConditioningUnavailable, match="SD 1.x only"):
        ella.check_unet(SimpleNamespace(config=SimpleNamespace(cross_attention_dim=32, addition_embed_type="text_time")))


def test_gluenet_encodes_the_native_prompt_and_refuses_unconfigured_languages(tiny_conditioning_files):
    gluenet = GlueNetConditioning.from_pretrained({"fr": tiny_conditioning_files["gluenet_fr"]}, tiny_conditioning_files["xlmr"])
    clip = _clip()
    native = TextInputs(**{**TEXTS.__dict__, "source_prompt": "un chat rouge sur le canapé"})
    conditioned = gluenet.prepare(native, clip)
    assert gluenet.encoder.last_texts == ("un chat rouge sur le canapé", "")
    cond, uncond = conditioned.denoising("final", 1)
    assert cond.shape == (1, 77, 32) and not torch.equal(cond, uncond)
    assert torch.equal(conditioned.denoising("per_box", 1)[0], clip.boxes)  # per-box prompts are English: CLIP
    assert torch.equal(conditioned.guidance("final", 1), clip.scene)
    other = gluenet.prepare(TextInputs(**{**TEXTS.__dict__, "source_prompt": "un chien bleu", "language": "fr"}), clip)
    assert not torch.allclose(other.denoising("final", 1)[0], cond)
    with pytest.raises(ConditioningUnavailable, match=r"no checkpoint for language 'zh' \(configured: fr; set LMD_GLUENET_CHECKPOINTS\)"):
        gluenet.prepare(TextInputs(**{**TEXTS.__dict__, "source_prompt": "三只猫在沙发上"}), clip)
    with pytest.raises(ConditioningUnavailable, match="has none"):
        gluenet.prepare(TEXTS, clip)
