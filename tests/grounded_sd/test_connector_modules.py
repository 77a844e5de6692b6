"""LI-DiT's connector and the language-model encoders on tiny random models: zero-initialised
gates, the instruction prefix and layer, character-to-token mapping, fusion, SDXL outputs."""

from __future__ import annotations

import pytest
import torch

from grounded_sd.conditioning.lidit import CollaborativeBlock, LiDiTConnector, RefinerSize, TokenRefiner
from grounded_sd.conditioning.llm import DEFAULT_INSTRUCTION, EncoderSpec, LLMTextEncoder
from grounded_sd.conditioning.trained import ConnectorSpec, TrainedConnector, build_module, phrase_tokens, save_connector


@pytest.fixture(scope="module")
def qwen(tiny_llm_path):
    torch.set_num_threads(1)
    return LLMTextEncoder.load(EncoderSpec(model=str(tiny_llm_path), max_tokens=24))


def test_untrained_refiner_passes_features_through_unchanged():
    torch.manual_seed(0)
    refiner = TokenRefiner(32, RefinerSize(blocks=2, cond_dim=16))
    x, cond = torch.randn(2, 7, 32) * 5, torch.randn(2, 16)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    assert torch.equal(refiner(x, mask, cond), x)
    block = CollaborativeBlock(32, 4, 16)
    a, b = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    fused = block([a, b], [torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)], cond)
    assert torch.equal(fused[0], a) and torch.equal(fused[1], b)
    # Once the gates open, the blocks act, differently per timestep / pooled text (the conditioning vector).
    for blk in refiner.blocks:
        torch.nn.init.normal_(blk.modulation[1].weight, std=0.1)
    first, second = refiner(x, mask, cond), refiner(x, mask, cond + 1)
    assert not torch.allclose(first, x) and not torch.allclose(first, second)


def test_connector_on_llm_features_is_a_projection_of_the_chosen_layer_without_the_instruction(qwen):
    encoded = qwen.encode(["a red square on the left", "two cats"])
    assert qwen.layer == -3 and qwen.instruction == DEFAULT_INSTRUCTION
    n = encoded.n_instruction
    assert n == len(qwen.tokenizer(DEFAULT_INSTRUCTION + "\n").input_ids) > 10
    # the features are the third-from-last hidden states of the LLM on [instruction][prompt]
    ids, mask, _ = qwen.tokenize(["a red square on the left", "two cats"])
    reference = qwen.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    assert torch.equal(encoded.features, reference[-3]) and not torch.equal(encoded.features, reference[-1])
    connector = LiDiTConnector([qwen.hidden_size], cross_attention_dim=40, size=RefinerSize(cond_dim=16))
    out = connector([encoded.features], [encoded.mask], [n], torch.tensor([10, 900]))
    assert out.hidden_states.shape == (2, qwen.spec.max_tokens, 40) and out.pooled is None
    expected = connector.projections[0](connector.norms_out[0](encoded.features))[:, n:]
    torch.testing.assert_close(out.hidden_states, expected)


def _covered(prompt: str, encoded, row: int, tokens: tuple[int, ...]) -> str:
    return "".join(prompt[slice(*encoded.offsets[row][i])] for i in tokens)


@pytest.mark.parametrize("which", ["qwen2", "llama", "t5"])
def test_phrase_characters_map_to_their_own_tokens(which, tiny_llm_path, tiny_llama_path, tiny_conditioning_files):
    path = {"qwen2": tiny_llm_path, "llama": tiny_llama_path, "t5": tiny_conditioning_files["t5"]}[which]
    encoder = LLMTextEncoder.load(EncoderSpec(model=str(path), max_tokens=32))
    prompt = "a red cat, a red cat and two dogs; (a red cat)."
    first, second, third = 0, prompt.index("a red cat", 1), prompt.rindex("a red cat")
    encoded = encoder.encode([prompt])
    spans = [encoded.tokens_for_span(0, s, s + len("a red cat")) for s in (first, second, third)]
    assert len({spans[0], spans[1], spans[2]}) == 3  # the repeated phrase: three different token sets
    for tokens in spans:
        assert _covered(prompt, encoded, 0, tokens).replace(" ", "") == "aredcat"
    dogs = encoded.tokens_for_span(0, prompt.index("dogs"), prompt.index("dogs") + 4)
    assert _covered(prompt, encoded, 0, dogs).strip() == "dogs"
    # punctuation next to a phrase is not part of it
    assert all("," not in _covered(prompt, encoded, 0, (t,)) and "(" not in _covered(prompt, encoded, 0, (t,)) for t in spans[0] + spans[2])
    if which == "llama":  # the BOS stays before the instruction; the prompt part starts with the prompt
        assert encoder.prefix_ids[0] == encoder.tokenizer.bos_token_id and encoded.offsets[0][0] is not None
    if which == "t5":  # no instruction; T5's EOS closes the prompt and maps to no characters
        last = int(encoded.mask[0].sum()) - 1
        assert encoded.n_instruction == 0 and encoded.offsets[0][last] is None and encoded.offsets[0][last - 1][1] == len(prompt)


def test_two_fused_llms_concatenate_tokens_and_keep_the_mapping(tiny_llm_path, tiny_llama_path, tmp_path):
    specs = [EncoderSpec(model=str(tiny_llm_path), max_tokens=16), EncoderSpec(model=str(tiny_llama_path), max_tokens=12)]
    spec = ConnectorSpec(kind="lidit", encoders=specs, in_dims=[32, 24], cross_attention_dim=32, refiner=RefinerSize(blocks=1, cond_dim=16))
    save_connector(tmp_path / "c", spec, build_module(spec))
    connector = TrainedConnector.load(tmp_path / "c")
    prompt = "two dogs and a blue ball"
    encoded = connector.encode([prompt, ""])
    out = connector(encoded, 500)
    assert out.hidden_states.shape == (2, 16 + 12, 32) and connector.output_tokens == 28
    start = prompt.index("a blue ball")
    tokens = phrase_tokens(encoded, 0, start, len(prompt))
    own = [encoded[0].tokens_for_span(0, start, len(prompt)), encoded[1].tokens_for_span(0, start, len(prompt))]
    assert tokens == own[0] + tuple(16 + i for i in own[1]) and own[0] and own[1]
    assert connector.module.collaborative is not None


def test_sdxl_connector_also_makes_the_pooled_embedding(qwen):
    spec = ConnectorSpec(kind="lidit", encoders=[qwen.spec], in_dims=[32], cross_attention_dim=48, pooled_dim=16)
    module = build_module(spec)
    encoded = qwen.encode(["a red square", "a blue circle on the right"])
    out = module([encoded.features], [encoded.mask], [encoded.n_instruction], torch.tensor([1, 999]))
    assert out.hidden_states.shape == (2, 24, 48) and out.pooled.shape == (2, 16)
    assert not torch.allclose(out.pooled[0], out.pooled[1])


def test_connector_conditioning_guides_each_phrase_on_its_own_tokens(tiny_llm_path, tmp_path):
    from grounded_sd.conditioning import ClipEmbeddings, TextInputs
    from grounded_sd.conditioning.connector import ConnectorConditioning
    from grounded_sd.prompts import group_phrases, object_phrase_span, object_prompt, scene_phrase_spans, scene_prompt
    from layout_planner.layout import Layout

    spec = ConnectorSpec(kind="lidit", encoders=[EncoderSpec(model=str(tiny_llm_path), max_tokens=40)], in_dims=[32], cross_attention_dim=32)
    save_connector(tmp_path / "c", spec, build_module(spec))
    conditioning = ConnectorConditioning.from_path(tmp_path / "c")
    assert conditioning.default_mode == "tokens"
    layout = Layout.model_validate({
        "background": "a room, with a red cat",
        "objects": [
            {"id": "c1", "phrase": "a red cat", "box": [0.0, 0.5, 0.3, 0.9]},
            {"id": "c2", "phrase": "a red cat", "box": [0.6, 0.5, 0.9, 0.9]},
            {"id": "b", "phrase": "a ball (blue)", "box": [0.3, 0.1, 0.6, 0.4]},
            {"id": "d", "phrase": "a dog", "box": [0.1, 0.1, 0.3, 0.3]},
        ],
    })
    groups = group_phrases(layout)
    scene = scene_prompt(layout.background, groups)
    boxes = tuple(object_prompt(layout.background, o.phrase) for o in layout.objects)
    clip = ClipEmbeddings(torch.zeros(1, 77, 32), torch.zeros(1, 77, 32), torch.zeros(4, 77, 32), torch.zeros(1, 77, 32))
    conditioned = conditioning.prepare(TextInputs(scene, boxes, "", ""), clip)
    encoded = conditioned._encode("final")
    for group in groups:  # "two red cats", "a ball (blue)", "a dog": the phrase's own tokens, not the background's "a red cat"
        start, end = scene_phrase_spans(layout.background, groups)[group.phrase]
        assert scene[start:end] == group.text
        tokens = conditioned.guidance_tokens("final", 0, (), (start, end))
        assert tokens and "".join(scene[slice(*encoded[0].offsets[0][i])] for i in tokens).replace(" ", "") == group.text.replace(" ", "")
        assert min(encoded[0].offsets[0][i][0] for i in tokens) >= len(layout.background)
    for row, obj in enumerate(layout.objects):
        start, end = object_phrase_span(layout.background, obj.phrase)
        assert boxes[row][start:end] == obj.phrase and conditioned.guidance_tokens("per_box", row, (), (start, end))
    cond, uncond = conditioned.denoising("final", 500)
    assert cond.shape == (1, 40, 32) and uncond.shape == (1, 40, 32)
    assert torch.equal(conditioned.guidance("final", 500), cond)  # tokens mode: guidance reads the connector's keys
    replace = conditioning.prepare(TextInputs(scene, boxes, "", ""), clip, mode="replace")
    assert replace.guidance("final", 500) is clip.scene and replace.guidance_tokens("final", 0, (3, 4), (0, 1)) == (3, 4)
