"""ELLA and GlueNet inside the full LMD run on the tiny SD: guidance stays on CLIP, denoising
uses the conditioning (per-box pass and final pass), every stage still works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd import LMDOptions
from grounded_sd.conditioning import ConditioningCache, ConditioningConfig
from grounded_sd.errors import ConditioningUnavailable

SIZE = 64
LAYOUT = {
    "objects": [
        {"id": "cat", "phrase": "a red cat", "box": [0.05, 0.1, 0.45, 0.6]},
        {"id": "dog", "phrase": "a dog", "box": [0.5, 0.4, 0.95, 0.95]},
    ],
    "background": "a realistic park",
}
FRENCH = "un chat rouge et un chien dans un parc"


@pytest.fixture(scope="module")
def conditionings(tiny_conditioning_files) -> ConditioningCache:
    config = ConditioningConfig(
        ella_checkpoint=str(tiny_conditioning_files["ella"]), ella_t5=str(tiny_conditioning_files["t5"]),
        gluenet_checkpoints={"fr": str(tiny_conditioning_files["gluenet_fr"])}, gluenet_xlmr=str(tiny_conditioning_files["xlmr"]),
    )
    return ConditioningCache(config, device="cpu", dtype=torch.float32)


def run(pipe, conditionings, name: str, seed: int = 3, **options):
    return pipe(
        LAYOUT, seed=seed, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=4, loss_threshold=0.0, **options),
        conditioning=conditionings.get(name), source_prompt=FRENCH,
    )


@pytest.fixture(scope="module")
def clip(tiny_pipeline, conditionings):
    """The same run conditioned on CLIP (today's behaviour), to compare with."""
    return run(tiny_pipeline, conditionings, "clip")


class EmbeddingsSeen:
    """The encoder_hidden_states of every real UNet forward, in order (a forward pre-hook)."""

    def __init__(self, unet) -> None:
        self.calls: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.calls.append(states.detach().clone())
        self.timesteps.append(torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None)).clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("name", "mode", "widths"),
    [("ella", "replace", {77, 8}), ("ella", "concat", {8 + 77}), ("gluenet", "replace", {77})],  # tokens the UNet saw
)
def test_every_stage_runs_and_guidance_still_lowers_each_objects_energy(tiny_pipeline, conditionings, clip, name, mode, widths):
    with EmbeddingsSeen(tiny_pipeline.unet) as seen:
        result = run(tiny_pipeline, conditionings, name, conditioning_mode=mode)
    again = run(tiny_pipeline, conditionings, name, conditioning_mode=mode)
    report = result.report
    assert (report.conditioning, report.conditioning_mode) == (name, mode)
    assert {e.shape[1] for e in seen.calls} == widths
    assert [s.name for s in report.stages] == ["per_box", "masks", "final"]
    assert set(result.masks) == {"cat", "dog"}
    for obj in report.objects:
        assert obj.per_box_energy.after_first_step < obj.per_box_energy.start, obj.id
        assert obj.final_energy.start is not None and obj.final_energy.iterations > 0
    # the phrases' CLIP tokens are found in every mode (concat: shifted past ELLA's tokens)
    assert [o.token_count for o in report.objects] == [o.token_count for o in clip.report.objects]
    assert np.array_equal(pixels(result.image), pixels(again.image))  # same seed, same pixels
    assert np.abs(pixels(result.image) - pixels(clip.image)).mean() > 0.5  # the conditioning changed the image


def test_ella_guides_on_clip_and_denoises_on_its_tokens_recomputed_per_step(tiny_pipeline, conditionings):
    ella = conditionings.get("ella")
    connector_runs = []
    handle = ella.ella.connector.register_forward_hook(lambda *a: connector_runs.append(1))
    try:
        with EmbeddingsSeen(tiny_pipeline.unet) as seen:
            result = run(tiny_pipeline, conditionings, "ella")
    finally:
        handle.remove()
    steps = result.report.steps
    guided = [e for e in seen.calls if e.shape[1] == 77]  # guidance forwards: CLIP
    denoised = [e for e in seen.calls if e.shape[1] == 8]  # CFG forwards: ELLA's 8 tokens (tiny connector)
    assert len(guided) + len(denoised) == len(seen.calls)
    assert len(denoised) == result.report.per_box_steps + steps  # one CFG forward per step and pass
    assert len(guided) > len(denoised)  # guidance ran several forwards per step...
    # ...and the connector ran once per step and pass for each prompt (2 objects + negative; scene + negative)
    assert len(connector_runs) == 3 * result.report.per_box_steps + 2 * steps
    final = denoised[result.report.per_box_steps :]
    assert not torch.allclose(final[0], final[1])  # another timestep, other tokens


def test_gluenet_denoises_the_final_pass_with_the_native_prompt(tiny_pipeline, conditionings, clip):
    gluenet = conditionings.get("gluenet")
    with EmbeddingsSeen(tiny_pipeline.unet) as seen:
        result = run(tiny_pipeline, conditionings, "gluenet")
    assert FRENCH in gluenet.encoder.last_texts and result.report.language == "fr"
    # the per-box pass (English per-box prompts) is CLIP's, latent for latent
    assert torch.equal(result.intermediates.per_box_latents, clip.intermediates.per_box_latents)
    # the final pass's CFG forwards saw GlueNet's embeddings of the French prompt, not CLIP's
    steps = result.report.steps
    final_cfg = [e for e in seen.calls if e.shape[0] == 2][-steps:]
    expected = gluenet.translator("fr")(gluenet.encoder.encode([FRENCH, ""]))
    assert torch.allclose(final_cfg[0][1], expected[0], atol=1e-5) and torch.allclose(final_cfg[0][0], expected[1], atol=1e-5)
    assert not torch.allclose(result.intermediates.final_latents, clip.intermediates.final_latents)
    assert any("gluenet (fr)" in note for note in result.report.notes)


def test_gluenet_refuses_a_language_without_a_checkpoint(tiny_pipeline, conditionings):
    with pytest.raises(ConditioningUnavailable, match=r"no checkpoint for language 'zh'"):
        tiny_pipeline(LAYOUT, seed=1, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=2),
                      conditioning=conditionings.get("gluenet"), source_prompt="公园里有一只红猫和一只狗")
    with pytest.raises(ConditioningUnavailable, match=r"no checkpoint for language 'es'"):
        tiny_pipeline(LAYOUT, seed=1, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=2),
                      conditioning=conditionings.get("gluenet"), source_prompt=FRENCH, language="es")


def test_a_connector_for_another_unet_width_is_refused(tiny_pipeline, tiny_conditioning_files, tmp_path):
    from grounded_sd.conditioning.ella import ELLAConditioning
    from grounded_sd.conditioning.random_encoders import tiny_ella_config, write_random_ella

    path = write_random_ella(tmp_path / "wide.safetensors", tiny_ella_config(48, 32))
    wide = ELLAConditioning.from_pretrained(path, tiny_conditioning_files["t5"])
    with pytest.raises(ConditioningUnavailable, match="cross_attention_dim is 32"):
        tiny_pipeline(LAYOUT, seed=1, width=SIZE, height=SIZE, options=LMDOptions.reference(steps=2), conditioning=wide)


@pytest.mark.parametrize("negative", [None, "empty"])
def test_ella_encodes_the_layouts_negative_or_the_empty_string_as_the_official_pipeline(tiny_pipeline, conditionings, negative):
    """Default: ELLA of the layout's negative prompt is the unconditional row the UNet denoises
    with; ``empty``: ELLA of "" (TencentQQGYLab/ELLA's inference.py); the report says which."""
    ella = conditionings.get("ella")
    options = LMDOptions.reference(steps=4, loss_threshold=0.0, conditioning_negative=negative)
    with EmbeddingsSeen(tiny_pipeline.unet) as seen:
        result = tiny_pipeline({**LAYOUT, "negative": "a blue dog"}, seed=3, width=SIZE, height=SIZE, options=options, conditioning=ella)
    report = result.report
    assert "a blue dog" in report.negative_prompt  # CLIP's negative is the layout's either way
    uncond, t = next((e[0], t) for e, t in zip(reversed(seen.calls), reversed(seen.timesteps)) if e.shape[1] == 8)
    encoded = "" if negative == "empty" else report.negative_prompt
    with torch.no_grad():
        expected = ella.ella(ella.encoder.encode([encoded]), t.reshape(-1)[:1])[0]
        other = ella.ella(ella.encoder.encode([report.negative_prompt if negative == "empty" else ""]), t.reshape(-1)[:1])[0]
    assert torch.allclose(uncond, expected, atol=1e-5) and not torch.allclose(uncond, other, atol=1e-3)
    assert report.conditioning_negative == (negative or "layout")
    assert result.parameters().conditioning.negative == report.conditioning_negative  # the PNG records it too
    assert any("empty string as the negative" in note for note in report.notes) == (negative == "empty")


@pytest.mark.parametrize(("name", "negative"), [("clip", "empty"), ("gluenet", "layout")])
def test_a_negative_the_conditioning_cannot_encode_is_refused(tiny_pipeline, conditionings, name, negative):
    with pytest.raises(ConditioningUnavailable, match=f"encodes the negative as .*not '{negative}'"):
        run(tiny_pipeline, conditionings, name, conditioning_negative=negative)
