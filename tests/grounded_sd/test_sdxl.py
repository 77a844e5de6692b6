"""LMD on an SDXL base: the tiny random SDXL (two text encoders, a ``text_time`` UNet) through the
real loading code, the Python API, the CLI and the refiner (docs/models.md "SDXL")."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch

from grounded_sd import InvalidOptions, LMDOptions, ModelLoadError, Refiner, RefinerOptions
from grounded_sd.per_box import box_negative
from grounded_sd.prompts import object_token_indices
from grounded_sd.random_model import WORDS, write_clip_tokenizer
from lmd.cli import main

LAYOUT = {
    "objects": [
        {"id": "cat", "phrase": "a red cat", "box": [0.05, 0.1, 0.45, 0.6]},
        {"id": "dog", "phrase": "a dog", "box": [0.5, 0.4, 0.95, 0.95]},
    ],
    "background": "a realistic park",
}
GUIDED = [  # the default rule on the tiny SDXL: the mid block's and the first up block's cross-attentions
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.1.attn2",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.0.transformer_blocks.1.attn2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.1.transformer_blocks.1.attn2",
]


def _unet_calls(pipe):
    """Record what every UNet call receives: (latent rows need grad, context, added conditions)."""
    calls = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        added = {k: v.detach().clone() for k, v in added.items()} if added else None
        calls.append((args[0].requires_grad, kwargs["encoder_hidden_states"].detach().clone(), added))

    return calls, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def observed(tiny_sdxl_pipeline):
    """One reference-preset LMD run on a non-square image, with every UNet call recorded."""
    calls, handle = _unet_calls(tiny_sdxl_pipeline)
    try:
        result = tiny_sdxl_pipeline(LAYOUT, seed=5, width=64, height=48, options=LMDOptions.reference(steps=3))
    finally:
        handle.remove()
    return result, calls


def test_sdxl_loads_with_both_encoders_and_defaults_to_its_own_size(tiny_sdxl_pipeline):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = tiny_sdxl_pipeline
    assert pipe.is_sdxl and isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token != "!"  # as SDXL 1.0's two tokenizers
    hidden, pooled = pipe._encode_texts(["a red cat", "a dog"])
    assert hidden.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)  # both encoders' tokens; the second's pooled
    result = pipe(LAYOUT, seed=1, options=LMDOptions.fast(steps=2))
    assert result.image.size == (pipe.native_size, pipe.native_size) == (64, 64)  # sample size 32 x VAE factor 2
    assert result.report.time_ids == [64, 64, 0, 0, 64, 64]


def test_prompts_are_encoded_as_diffusers_sdxl_pipeline_encodes_them(tiny_sdxl_pipeline, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    prompt, negative = "a realistic park with a red cat", "blurry, two, many"
    embeds, negative_embeds, pooled, negative_pooled = reference.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative
    )
    ours = tiny_sdxl_pipeline._encode_texts([prompt, negative])
    assert torch.allclose(ours[0], torch.cat([embeds, negative_embeds]), atol=1e-6)
    assert torch.allclose(ours[1], torch.cat([pooled, negative_pooled]), atol=1e-6)


def test_every_unet_call_gets_its_rows_pooled_embeddings_and_time_ids(tiny_sdxl_pipeline, observed):
    pipe = tiny_sdxl_pipeline
    result, calls = observed
    report = result.report
    texts = [report.prompt, report.negative_prompt, *report.per_box_prompts.values(), box_negative(result.layout, LMDOptions.reference())]
    encoded = {text: pipe._encode_texts([text]) for text in texts}
    seen: dict[bool, set[str]] = {True: set(), False: set()}  # guidance forwards (latent with grad), CFG forwards
    for guided, context, added in calls:
        assert added is not None and set(added) == {"text_embeds", "time_ids"}
        assert added["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]] * context.shape[0]  # (h, w), crop (0, 0), (h, w)
        for row in range(context.shape[0]):
            text = min(texts, key=lambda t: float((encoded[t][0][0] - context[row]).abs().max()))
            assert torch.allclose(context[row], encoded[text][0][0], atol=1e-5)
            assert torch.allclose(added["text_embeds"][row], encoded[text][1][0], atol=1e-5), (text, guided)
            seen[guided].add(text)
    assert seen[False] == set(texts)  # every prompt, the negatives (CFG's unconditional rows) included
    assert seen[True] == {report.prompt, *report.per_box_prompts.values()}  # guidance: the conditional prompts
    assert [stage.name for stage in report.stages] == ["per_box", "masks", "final"]
    assert all(stage.unet.backward > 0 for stage in report.stages if stage.name != "masks")


def test_guidance_lowers_the_energy_on_sdxl(observed):
    result, _ = observed
    for obj in result.report.objects:
        for energy in (obj.per_box_energy, obj.final_energy):
            assert energy.after_first_step < energy.start  # same latent and timestep, after the updates
    assert set(result.masks) == {"cat", "dog"} and result.intermediates.composed is not None
    assert result.intermediates.owner.unique().tolist() == [0, 1, 2]  # both objects composed into the scene


def test_the_report_lists_the_sdxl_layers_and_their_head_scaled_threshold(tiny_sdxl_pipeline, observed):
    result, _ = observed
    report = result.report
    assert report.model_type == "sdxl" and report.attention_layers == GUIDED
    modules = dict(tiny_sdxl_pipeline.unet.named_modules())
    assert {modules[name].heads for name in GUIDED} == {4}
    assert report.energy_threshold == pytest.approx(5.0 * 4 / 8)  # the reference's 5.0 is on SD 1.5's 8 heads
    with pytest.raises(InvalidOptions, match="up_blocks.1.attentions.0.transformer_blocks.0.attn2"):
        tiny_sdxl_pipeline(LAYOUT, seed=1, options=LMDOptions.fast(steps=2, attention_layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]))


def test_plain_sd_on_sdxl_passes_the_added_conditions(tiny_sdxl_pipeline):
    calls, handle = _unet_calls(tiny_sdxl_pipeline)
    try:
        result = tiny_sdxl_pipeline(LAYOUT, seed=2, variant="sd", options=LMDOptions.fast(steps=2))
    finally:
        handle.remove()
    assert len(calls) == 2 and all(added is not None and added["text_embeds"].shape == (2, 40) for _, _, added in calls)
    assert result.report.model_type == "sdxl" and not result.masks


def test_tokenizers_that_place_a_phrase_differently_are_refused(tiny_sdxl_pipeline, tmp_path):
    pipe = copy.copy(tiny_sdxl_pipeline)
    pipe.tokenizer_2 = write_clip_tokenizer(tmp_path / "tokenizer_2", [w for w in WORDS if w != "red"])  # "red" in pieces
    first, second = (object_token_indices(t, LAYOUT["background"], "a red cat") for t in (pipe.tokenizer, pipe.tokenizer_2))
    assert len(second) > len(first)
    with pytest.raises(ModelLoadError, match=re.escape(f"tokenizer: {first}, tokenizer_2: {second}")):
        pipe(LAYOUT, seed=1, options=LMDOptions.fast(steps=2))


def test_sdxl_directories_missing_a_part_are_refused(tiny_sdxl_path, tiny_refiner_path, tmp_path):
    from grounded_sd import LMDPipeline

    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_path, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelLoadError, match=r"not a diffusers SDXL directory: missing text_encoder_2/$"):
        LMDPipeline.from_pretrained(broken, device="cpu")
    with pytest.raises(ModelLoadError, match=r"missing text_encoder/, tokenizer/$"):  # the refiner is no base
        LMDPipeline.from_pretrained(tiny_refiner_path, device="cpu")


def test_the_refiner_finishes_an_sdxl_base_image(tiny_sdxl_pipeline, tiny_refiner_path):
    result = tiny_sdxl_pipeline(LAYOUT, seed=3, options=LMDOptions.fast(steps=2))
    refined = Refiner.from_pretrained(tiny_refiner_path, device="cpu").refine(result, options=RefinerOptions(steps=4, strength=0.5, resolution=96))
    assert refined.image.size == (96, 96) and refined.report.refiner.steps == 2
    assert refined.report.model_type == "sdxl" and set(refined.masks) == {"cat", "dog"}


def test_lmd_generate_renders_a_layout_with_an_sdxl_model(clean_env, tiny_sdxl_path, capsys):
    from PIL import Image

    layout_path = clean_env / "layout.json"
    layout_path.write_text(json.dumps(LAYOUT))
    out = clean_env / "out"
    argv = ["generate", "--layout", str(layout_path), "--out", str(out), "--model", str(tiny_sdxl_path), "--seed", "3",
            "--steps", "3", "--quiet", "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    assert Image.open(out / "image.png").size == (64, 64)  # no --width: the model's own size
    report = json.loads((out / "report.json").read_text())
    assert report["model_type"] == "sdxl" and report["attention_layers"] == GUIDED and report["time_ids"] == [64, 64, 0, 0, 64, 64]
    assert [s["name"] for s in report["stages"]] == ["per_box", "masks", "final"] and report["unet_total"]["backward"] > 0
    assert (out / "masks" / "cat.png").is_file() and "per-box energy" in capsys.readouterr().out
