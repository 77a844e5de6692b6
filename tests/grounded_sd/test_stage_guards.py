"""What each stage of the controller hands the UNet and the mask code, observed from outside
(forward hooks on the diffusers modules), on the tiny random SD: every test fails when its
stage is broken (a row given another row's prompt, tokens or box; the negative embeddings in
guidance; masks not from attention or from the wrong steps; GLIGEN inputs on the wrong rows;
the wrong SAM prompt; attention transfer without effect)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grounded_sd import LMDOptions, LMDPipeline
from grounded_sd.attention import resolve_attention_layers
from grounded_sd.masks import object_mask
from grounded_sd.prompts import object_prompt, object_token_indices

SIZE = 64
CAT = {"id": "cat", "phrase": "a fluffy red cat", "box": [0.55, 0.2, 0.95, 0.9]}
DOG = {"id": "dog", "phrase": "a dog", "box": [0.05, 0.1, 0.45, 0.6]}
BACKGROUND = "a realistic park"


def _layout(*objects) -> dict:
    return {"objects": list(objects), "background": BACKGROUND}


def _opts(**overrides) -> LMDOptions:
    """The reference's options on the boxes as given: these guards compare runs of different layouts
    box for box (the reference's stretch over the canvas, rescale_boxes, has its own tests)."""
    return LMDOptions.reference(**{"steps": 4, "energy_checks": False, "rescale_boxes": False, **overrides})


def _encode(pipe: LMDPipeline, texts: list[str]) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


class UNetInputs:
    """Every UNet call's text embeddings, and whether autograd was on (guidance forwards)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[tuple[bool, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        self.calls.append((torch.is_grad_enabled(), kwargs["encoder_hidden_states"].detach().clone()))

    def close(self) -> None:
        self.handle.remove()


def test_each_per_box_row_has_its_own_prompt_tokens_and_box(tiny_pipeline):
    """The cat as the second row of two gets exactly the per-box trajectory it gets alone: its row
    uses its own prompt, phrase tokens (more than the dog's), box and noise, never another row's."""
    # threshold 0: guidance never stops, so the last bits that batching changes cannot flip a stop decision
    pair = tiny_pipeline(_layout(DOG, CAT), seed=4, width=SIZE, height=SIZE, options=_opts(loss_threshold=0.0))
    alone = tiny_pipeline(_layout(CAT), seed=4, width=SIZE, height=SIZE, options=_opts(loss_threshold=0.0))
    assert pair.report.per_box_prompts == {"dog": "a realistic park with a dog", "cat": "a realistic park with a fluffy red cat"}
    counts = [len(object_token_indices(tiny_pipeline.tokenizer, BACKGROUND, o["phrase"])) for o in (DOG, CAT)]
    assert [o.token_count for o in pair.report.objects] == counts and counts[0] != counts[1]
    # equal up to batching's last bits, amplified over the steps (measured 6e-4 on latents of magnitude 17)
    assert torch.allclose(pair.intermediates.per_box_latents[:, 1], alone.intermediates.per_box_latents[:, 0], atol=3e-3)
    assert not torch.allclose(pair.intermediates.per_box_latents[:, 0], alone.intermediates.per_box_latents[:, 0], atol=1e-2)


def test_guidance_forwards_use_the_conditional_embeddings(tiny_pipeline):
    inputs = UNetInputs(tiny_pipeline.unet)
    try:
        tiny_pipeline(_layout(DOG, CAT), seed=4, width=SIZE, height=SIZE, options=_opts())
    finally:
        inputs.close()
    per_box_cond = _encode(tiny_pipeline, [object_prompt(BACKGROUND, o["phrase"]) for o in (DOG, CAT)])
    scene_cond = _encode(tiny_pipeline, [f"{BACKGROUND} with a dog and a fluffy red cat"])
    guided = [embeddings for grad, embeddings in inputs.calls if grad]
    assert guided, "no guidance forward ran"
    first = guided[0]  # the per-box pass's first guided step: both rows
    assert first.shape[0] == 2 and torch.allclose(first, per_box_cond, atol=1e-5)
    final = [e for e in guided if e.shape[0] == 1]
    assert final and all(torch.allclose(e, scene_cond, atol=1e-5) for e in final)
    # the CFG forwards carry the negative prompt in their first half: guidance never sees it
    cfg = [embeddings for grad, embeddings in inputs.calls if not grad and embeddings.shape[0] == 4]
    negative = cfg[0][0]
    assert not any(torch.allclose(row, negative, atol=1e-3) for e in guided for row in e)


def _attention_probs(module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Softmax(q k^T * scale) of a diffusers Attention, recomputed from its own projections: (batch, heads, cells, tokens)."""
    q, k = module.to_q(hidden), module.to_k(context)
    batch, heads = q.shape[0], module.heads
    q = q.view(batch, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(batch, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * module.scale).softmax(dim=-1)


def test_masks_come_from_attention_aggregated_from_the_configured_step(tiny_pipeline):
    layers = resolve_attention_layers(tiny_pipeline.unet, None)
    modules = dict(tiny_pipeline.unet.named_modules())
    seen: list[dict[str, torch.Tensor]] = []  # per-box CFG forwards, in order: layer -> probs

    def hook(name):
        def record(module, args, kwargs):
            hidden, context = args[0], kwargs.get("encoder_hidden_states")
            if context is None or torch.is_grad_enabled() or hidden.shape[0] != 4:
                return
            if not seen or name in seen[-1]:
                seen.append({})
            with torch.no_grad():
                seen[-1][name] = _attention_probs(module, hidden, context)
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name), with_kwargs=True) for name in layers]
    try:
        options = _opts(mask_from_step=25, per_box_placement="in_place")  # of 50: step 2 of 4; masks where generated
        result = tiny_pipeline(_layout(DOG, CAT), seed=4, width=SIZE, height=SIZE, options=options, per_box_images=True)
    finally:
        for handle in handles:
            handle.remove()
    assert options.mask_first_step() == 2
    per_box = seen[: options.steps]  # the final pass's CFG forwards have batch 2 and are not recorded
    assert len(per_box) == 4 and all(set(step) == set(layers) for step in per_box)
    for row, obj in enumerate((DOG, CAT)):
        token = object_token_indices(tiny_pipeline.tokenizer, BACKGROUND, obj["phrase"])[-1]

        def token_map(step: dict[str, torch.Tensor]) -> torch.Tensor:
            maps = torch.stack([step[name][2 + row, :, :, token].mean(dim=0) for name in layers]).mean(dim=0)
            return maps.view(16, 16)

        expected = torch.stack([token_map(step) for step in per_box[2:]]).mean(dim=0)
        every_step = torch.stack([token_map(step) for step in per_box]).mean(dim=0)
        got = result.intermediates.attention[obj["id"]]
        assert got.shape == (16, 16)  # at the map's own resolution: smoothing is in its pixels
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, every_step, atol=1e-5)

        entry = result.report.objects[row]
        assert entry.mask_source == "attention", entry.mask_detail
        image = np.asarray(result.intermediates.per_box_images[obj["id"]])
        rebuilt = object_mask(image, got.numpy(), tuple(obj["box"]), predictor=None, options=options.masks)
        assert np.array_equal(np.asarray(result.masks[obj["id"]]) > 0, rebuilt.mask)


def test_attention_transfer_changes_the_final_pass_only(tiny_pipeline):
    # masks aggregate from step 0, so both runs capture the same per-box maps (the explicit softmax
    # of a capture differs from SDPA in the last bits, which the tiny model's steps would amplify)
    on = tiny_pipeline(_layout(DOG, CAT), seed=4, width=SIZE, height=SIZE, options=_opts(mask_from_step=0))
    off = tiny_pipeline(_layout(DOG, CAT), seed=4, width=SIZE, height=SIZE, options=_opts(mask_from_step=0, transfer_weight=0.0))
    assert torch.equal(on.intermediates.per_box_latents, off.intermediates.per_box_latents)
    assert not torch.allclose(on.intermediates.final_latents[-1], off.intermediates.final_latents[-1], atol=1e-3)


def test_lmd_asks_sam_with_a_point_and_lmd_plus_with_the_box(tiny_pipeline, tiny_gligen_sd_path, tiny_sam_predictor):
    from tests.support.tiny_sam import set_predicted_ious

    set_predicted_ious(tiny_sam_predictor.model, (0.95, 0.95, 0.95))
    options = _opts(steps=3, masks={"sam_min_coarse_iou": 0.0})
    pipe = LMDPipeline(
        tiny_pipeline.unet, tiny_pipeline.vae, tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, tiny_pipeline.scheduler,
        sam_predictor=tiny_sam_predictor,
    )
    lmd = pipe(_layout(DOG, CAT), seed=4, width=SIZE, height=SIZE, options=options)
    assert all(o.mask_source == "sam" and "(point prompt)" in o.mask_detail for o in lmd.report.objects), [o.mask_detail for o in lmd.report.objects]

    gligen = LMDPipeline.from_pretrained(tiny_gligen_sd_path, device="cpu")
    plus_pipe = LMDPipeline(gligen.unet, gligen.vae, gligen.text_encoder, gligen.tokenizer, gligen.scheduler, sam_predictor=tiny_sam_predictor)
    plus = plus_pipe(_layout(DOG, CAT), seed=4, variant="lmd_plus", width=SIZE, height=SIZE, options=options)
    assert all(o.mask_source == "sam" and "(box prompt)" in o.mask_detail for o in plus.report.objects), [o.mask_detail for o in plus.report.objects]


def _gligen_calls(pipe: LMDPipeline, layout: dict, **options) -> list[dict[str, torch.Tensor]]:
    """The GLIGEN inputs (boxes, phrase embeddings, presence masks) of every UNet call of one lmd_plus run."""
    calls: list[dict[str, torch.Tensor]] = []
    handle = pipe.unet.position_net.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({k: v.detach().clone() for k, v in kwargs.items()}), with_kwargs=True
    )
    try:
        pipe(layout, seed=4, variant="lmd_plus", width=SIZE, height=SIZE, options=_opts(**options))
    finally:
        handle.remove()
    return calls


def _pooled(pipe: LMDPipeline, phrases: list[str]) -> torch.Tensor:
    tokens = pipe.tokenizer(phrases, padding=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(**tokens).pooler_output


@pytest.fixture(scope="module")
def gligen_pipe(tiny_gligen_sd_path) -> LMDPipeline:
    return LMDPipeline.from_pretrained(tiny_gligen_sd_path, device="cpu")


def test_lmd_plus_rows_get_their_own_gligen_boxes_and_phrases_and_none_unconditionally(gligen_pipe):
    pipe = gligen_pipe
    calls = _gligen_calls(pipe, _layout(DOG, CAT), steps=5)
    pooled = _pooled(pipe, [DOG["phrase"], CAT["phrase"]])
    boxes = torch.tensor([DOG["box"], CAT["box"]])

    per_box = [c for c in calls if c["masks"].shape[0] == 4]  # CFG over 2 objects: 2 unconditional rows, then 2 conditional
    assert per_box
    for call in per_box:
        assert not call["masks"][:2].any(), "the unconditional half sees grounding"
        for row in range(2):
            masks, got_boxes, embeddings = call["masks"][2 + row], call["boxes"][2 + row], call["positive_embeddings"][2 + row]
            assert masks.tolist() == [1.0] + [0.0] * (len(masks) - 1)
            assert torch.allclose(got_boxes[0], boxes[row]) and not got_boxes[1:].any()
            assert torch.allclose(embeddings[0], pooled[row], atol=1e-5)

    final_cfg = [c for c in calls if c["masks"].shape[0] == 2]
    final_guidance = [c for c in calls if c["masks"].shape[0] == 1]
    assert final_cfg and final_guidance
    for call in final_cfg:
        assert not call["masks"][0].any()
        assert call["masks"][1, :2].tolist() == [1.0, 1.0] and not call["masks"][1, 2:].any()
        assert torch.allclose(call["boxes"][1, :2], boxes)
        assert torch.allclose(call["positive_embeddings"][1, :2], pooled, atol=1e-5)
    # the guidance forward reads GLIGEN's null tokens: the zeroed masks of the unconditional half, as the
    # reference's (models/pipelines.py:317 zeroes them, 381-384 hands that half to guidance)
    for call in final_guidance:
        assert not call["masks"].any()
    grounded = _gligen_calls(pipe, _layout(DOG, CAT), steps=5, guidance_grounding="grounded")  # ours before issue 23
    grounded_guidance = [c for c in grounded if c["masks"].shape[0] == 1]
    assert grounded_guidance and all(call["masks"][0, :2].tolist() == [1.0, 1.0] for call in grounded_guidance)
    assert all(torch.allclose(call["boxes"][0, :2], boxes) for call in grounded_guidance)


def test_lmd_plus_final_pass_gives_duplicated_objects_their_group_phrase(gligen_pipe):
    """generation/lmd_plus.py:463-467: each box of a phrase group gets the group's phrase ("two dogs")."""
    other = {**DOG, "id": "dog2", "box": [0.05, 0.65, 0.45, 0.95]}
    layout = _layout(DOG, CAT, other)
    for rule, phrases in (("group", ["two dogs", CAT["phrase"], "two dogs"]), ("object", [DOG["phrase"], CAT["phrase"], DOG["phrase"]])):
        calls = _gligen_calls(gligen_pipe, layout, steps=3, gligen_phrases=rule)
        final_cfg = [c for c in calls if c["masks"].shape[0] == 2]
        assert final_cfg
        expected = _pooled(gligen_pipe, phrases)
        assert all(torch.allclose(call["positive_embeddings"][1, :3], expected, atol=1e-5) for call in final_cfg), rule
    assert not torch.allclose(_pooled(gligen_pipe, ["two dogs"]), _pooled(gligen_pipe, [DOG["phrase"]]), atol=1e-3)
