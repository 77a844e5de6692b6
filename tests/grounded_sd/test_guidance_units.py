"""Energy, attention transfer, step size and the early-stop rules on hand-computed numbers (§2.1, §2.2, §2.6).

Each test pins a formula so that changing it (top-k to mean, mean to sum over tokens, a sign,
the scheduler's scale, the stop rule) fails here, without running a model.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from grounded_sd.counters import UNetCounter
from grounded_sd.guidance import EnergyTarget, GuidanceTrace, guidance_step_size, guide_latents, object_energy, transfer_loss

LEFT_COLUMN = (0.0, 0.0, 0.5, 1.0)  # on a 2x2 map: cells 0 and 2 (row-major)


def _probs(*heads: list[list[float]]) -> torch.Tensor:
    """(heads, cells, tokens) from per-head lists of per-token maps over the 4 cells."""
    return torch.tensor(heads, dtype=torch.float32).transpose(1, 2)


def test_energy_is_topk_inside_and_outside_mean_over_tokens_sum_over_heads():
    # token 0 is not the phrase's; tokens 1 and 2 are (a two-token phrase)
    head0 = [[0.9, 0.9, 0.9, 0.9], [0.5, 0.1, 0.3, 0.2], [0.2, 0.4, 0.1, 0.0]]
    head1 = [[0.0, 0.0, 0.0, 0.0], [0.25] * 4, [0.25] * 4]
    target = EnergyTarget("cat", (1, 2), LEFT_COLUMN, (LEFT_COLUMN,))
    energy = object_energy(_probs(head0, head1), target, (2, 2), topk_fraction=0.5, background_weight=4.0)
    # k = 1 inside (2 cells) and outside. head 0: token 1: (1 - 0.5) + 4 * 0.2 = 1.3; token 2: (1 - 0.2) + 4 * 0.4 = 2.4
    # -> mean 1.85 (a sum would be 3.7; the mean over the box instead of the top-k would give 1.2 for token 1)
    # head 1: (1 - 0.25) + 4 * 0.25 = 1.75 for both tokens -> 1.75; heads are summed: 3.6
    assert float(energy) == pytest.approx(3.6)


def test_energy_with_k_above_one_averages_the_k_largest():
    cells = [0.8, 0.0, 0.6, 0.0, 0.1, 0.0, 0.3, 0.0, 0.2, 0.0, 0.5, 0.0, 0.4, 0.0, 0.7, 0.0]  # 4x4, inside = even columns
    probs = torch.tensor(cells)[None, :, None]  # 1 head, 16 cells, 1 token
    box = (0.0, 0.0, 1.0, 1.0)
    target = EnergyTarget("x", (0,), box, (box,))
    energy = object_energy(probs, target, (4, 4), topk_fraction=0.25, background_weight=4.0)
    # the whole map is the box: k = 4 of 16; the 4 largest are 0.8, 0.7, 0.6, 0.5 -> 1 - 0.65; no outside term
    assert float(energy) == pytest.approx(0.35)


def test_attention_transfer_on_a_hand_computed_map():
    current = _probs([[0.0] * 4, [0.6, 0.2, 0.1, 0.1]], [[0.0] * 4, [0.1, 0.5, 0.3, 0.1]])
    reference = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.1, 0.5, 0.3, 0.1]])  # (heads, cells)
    target = EnergyTarget("cat", (0, 1), LEFT_COLUMN, (LEFT_COLUMN,))  # the object token is the last: 1
    loss = transfer_loss(current, target, reference, (2, 2))
    # head 0 in the box (cells 0, 2): current 0.6, 0.1 -> 6/7, 1/7; reference 0.1, 0.3 -> 1/4, 3/4; L1 = 2 (6/7 - 1/4)
    # head 1 equals the reference: 0. Mean over heads.
    assert float(loss) == pytest.approx((6 / 7 - 1 / 4))
    assert float(transfer_loss(_probs([[0.0] * 4, [0.1, 0.5, 0.3, 0.1]]), target, reference[:1], (2, 2))) == pytest.approx(0.0)


def test_attention_transfer_descends_toward_the_reference():
    """The sign: a gradient step down the transfer loss moves the current map toward the reference."""
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]], requires_grad=True)  # 1 head, 4 cells, 2 tokens
    reference = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    target = EnergyTarget("cat", (1,), LEFT_COLUMN, (LEFT_COLUMN,))
    before = transfer_loss(logits.softmax(dim=1), target, reference, (2, 2))
    before.backward()
    with torch.no_grad():
        after = transfer_loss((logits - 0.5 * logits.grad).softmax(dim=1), target, reference, (2, 2))
    assert float(before.detach()) > 0.1 and float(after) < float(before.detach())


def test_guidance_step_size_per_scheduler_kind():
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    t = ddim.timesteps[3]
    assert guidance_step_size(ddim, t, 3) == pytest.approx(float((1 - ddim.alphas_cumprod[int(t)]) ** 0.5))
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(10)
    t = euler.timesteps[3]
    expected = float(euler.sigmas[3]) ** 2
    assert guidance_step_size(euler, t, 3) == pytest.approx(expected)
    assert expected > 2.0  # far from any sqrt(1 - alpha_bar) <= 1: the two rules cannot be confused
    # DPM-Solver keeps sigmas too, but it is a VP scheduler (initial noise sigma 1): the alpha rule
    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(10)
    t = dpm.timesteps[3]
    assert getattr(dpm, "sigmas", None) is not None and dpm.init_noise_sigma == 1.0
    assert guidance_step_size(dpm, t, 3) == pytest.approx(float((1 - dpm.alphas_cumprod[int(t)]) ** 0.5))


# --- the early-stop rules on a quadratic "energy" E(z) = z^2 per row --------------------------------------
def _quadratic(threshold: float = 1.0):
    def forward(z: torch.Tensor, rows: list[int]) -> dict[str, torch.Tensor]:
        assert len(rows) == z.shape[0] and all(isinstance(row, int) for row in rows)
        return {"z": z}

    def loss_fn(maps: dict[str, torch.Tensor], rows: list[int]):
        energy = maps["z"].flatten(1).pow(2).sum(dim=1)
        return energy, [{f"row{row}": float(e)} for row, e in zip(rows, energy.detach())]

    return dict(forward=forward, loss_fn=loss_fn, counter=UNetCounter(torch.nn.Identity()), max_batch=None, scale=1.0, step_size=0.1, threshold=threshold)


def _z(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1)


def test_pass_rule_applies_the_first_update_under_the_threshold_then_stops_for_the_pass():
    """The reference: each iteration is gated by the energy the previous one computed (carried across steps)."""
    trace, kw = GuidanceTrace(), _quadratic()
    # every update multiplies z by 0.8 (z -= 0.1 * 2z)
    z = guide_latents(_z(2.0, 0.9), iterations=3, trace=trace, stop="pass", **kw)
    # row 0: E 4, 2.56, 1.64 -> three updates; row 1: E 0.81 is under, its update still applied, then it stops
    assert z.flatten().tolist() == pytest.approx([2.0 * 0.8**3, 0.9 * 0.8])
    z = guide_latents(z, iterations=1, trace=trace, stop="pass", **kw)  # row 0 carried 1.64 > 1: one more update
    assert z.flatten().tolist() == pytest.approx([2.0 * 0.8**4, 0.9 * 0.8])
    # row 0 carried 1.05 > 1: its energy is now 0.67, under; that update is still applied, then it stops
    z = guide_latents(z, iterations=2, trace=trace, stop="pass", **kw)
    assert z.flatten().tolist() == pytest.approx([2.0 * 0.8**5, 0.9 * 0.8])
    # both rows are done for this pass, even when their energy rises again
    z = guide_latents(_z(3.0, 3.0), iterations=2, trace=trace, stop="pass", **kw)
    assert z.flatten().tolist() == pytest.approx([3.0, 3.0])
    assert trace.iterations == 3 + 1 + 1  # the last call ran none


def test_step_rule_checks_afresh_and_resumes_when_the_energy_rises():
    trace, kw = GuidanceTrace(), _quadratic()
    z = guide_latents(_z(2.0, 0.9), iterations=3, trace=trace, stop="step", **kw)
    assert z.flatten().tolist() == pytest.approx([2.0 * 0.8**3, 0.9])  # row 1 under the threshold: not moved
    z = guide_latents(_z(0.9, 3.0), iterations=1, trace=trace, stop="step", **kw)
    assert z.flatten().tolist() == pytest.approx([0.9, 3.0 * 0.8])  # row 1 rose: guided again


def test_pass_rule_needs_the_pass_trace():
    with pytest.raises(ValueError, match="GuidanceTrace"):
        guide_latents(_z(1.0), iterations=1, stop="pass", **_quadratic())


def test_energy_top_k_over_several_cells_inside_and_outside_on_a_wide_map():
    # 2x4 map, box = left half (cells 0, 1, 4, 5); k = 0.5 * 4 = 2 on each side
    cells = [0.9, 0.1, 0.8, 0.0, 0.5, 0.3, 0.6, 0.2]
    probs = torch.tensor(cells)[None, :, None]
    box = (0.0, 0.0, 0.5, 1.0)
    energy = object_energy(probs, EnergyTarget("x", (0,), box, (box,)), (2, 4), topk_fraction=0.5, background_weight=2.0)
    # inside 0.9, 0.1, 0.5, 0.3 -> top 2 mean 0.7; outside 0.8, 0.0, 0.6, 0.2 -> top 2 mean 0.7
    assert float(energy) == pytest.approx((1 - 0.7) + 2.0 * 0.7)


def test_guidance_rules_at_the_threshold_scale_and_arguments():
    kw = _quadratic()
    trace = GuidanceTrace()
    # E exactly at the threshold counts as under it, for both rules
    assert guide_latents(_z(1.0), iterations=1, trace=trace, stop="step", **kw).flatten().tolist() == [1.0]
    trace.carried[0] = 1.0
    assert guide_latents(_z(3.0), iterations=1, trace=trace, stop="pass", **kw).flatten().tolist() == [3.0]
    # the default rule is "step"; the scale multiplies the step
    kw["scale"] = 2.0
    assert guide_latents(_z(0.5, 2.0), iterations=1, **kw).flatten().tolist() == pytest.approx([0.5, 2.0 * 0.6])
    with pytest.raises(ValueError, match="unknown guidance stop rule 'later'"):
        guide_latents(_z(1.0), iterations=1, stop="later", **kw)


def test_the_trace_keeps_each_objects_first_energy():
    trace, kw = GuidanceTrace(), _quadratic()
    guide_latents(_z(2.0, 0.9), iterations=2, trace=trace, stop="pass", **kw)
    assert trace.first == pytest.approx({"row0": 4.0, "row1": 0.81})
    assert trace.carried == pytest.approx({0: 2.56, 1: 0.81})
