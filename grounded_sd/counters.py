"""The one place UNet work is counted: every forward and every backward, with batch sizes.

The report and the benchmark read the same numbers. "samples" is the sum of batch sizes,
the honest unit of UNet work when batches differ; ``forward_s`` and ``backward_s`` are the
seconds spent inside those calls (CUDA is synchronised around each, so the time is the GPU's).
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from pydantic import BaseModel, Field


class UNetCalls(BaseModel):
    forward: int = 0
    backward: int = 0
    forward_samples: int = Field(0, description="sum of the batch sizes of the forwards")
    backward_samples: int = Field(0, description="sum of the batch sizes of the backwards")
    forward_batch_sizes: dict[int, int] = Field(default_factory=dict, description="batch size -> number of forwards")
    backward_batch_sizes: dict[int, int] = Field(default_factory=dict, description="batch size -> number of backwards")
    forward_s: float = Field(0.0, description="seconds inside UNet forwards")
    backward_s: float = Field(0.0, description="seconds inside latent gradients (UNet backwards)")

    def __add__(self, other: "UNetCalls") -> "UNetCalls":
        return UNetCalls(
            forward=self.forward + other.forward,
            backward=self.backward + other.backward,
            forward_samples=self.forward_samples + other.forward_samples,
            backward_samples=self.backward_samples + other.backward_samples,
            forward_batch_sizes=dict(Counter(self.forward_batch_sizes) + Counter(other.forward_batch_sizes)),
            backward_batch_sizes=dict(Counter(self.backward_batch_sizes) + Counter(other.backward_batch_sizes)),
            forward_s=self.forward_s + other.forward_s,
            backward_s=self.backward_s + other.backward_s,
        )


class UNetCounter:
    """Wraps UNet calls and latent gradients; counts them under the current stage name."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.stage = "setup"
        self.by_stage: dict[str, UNetCalls] = {}

    def _calls(self) -> UNetCalls:
        return self.by_stage.setdefault(self.stage, UNetCalls())

    def forward(
        self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One UNet call; ``added_cond_kwargs``: SDXL's ``text_embeds`` and ``time_ids``, one row per sample."""
        calls = self._calls()
        batch = sample.shape[0]
        calls.forward += 1
        calls.forward_samples += batch
        calls.forward_batch_sizes[batch] = calls.forward_batch_sizes.get(batch, 0) + 1
        started = self._clock(sample)
        try:
            return self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=added_cond_kwargs, return_dict=False,
            )[0]
        finally:
            calls.forward_s += self._clock(sample) - started

    def grad(self, loss: torch.Tensor, latents: torch.Tensor, *, batch: int) -> torch.Tensor:
        calls = self._calls()
        calls.backward += 1
        calls.backward_samples += batch
        calls.backward_batch_sizes[batch] = calls.backward_batch_sizes.get(batch, 0) + 1
        started = self._clock(latents)
        grad = torch.autograd.grad(loss, [latents])[0]
        calls.backward_s += self._clock(latents) - started
        return grad

    @staticmethod
    def _clock(tensor: torch.Tensor) -> float:
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter()

    def total(self) -> UNetCalls:
        total = UNetCalls()
        for calls in self.by_stage.values():
            total = total + calls
        return total
