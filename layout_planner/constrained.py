"""Pieces that plug into ``transformers``' ``generate`` for the local planner (imports torch).

``GrammarLogitsProcessor`` lets through only the tokens the layout grammar allows next (an
``llguidance`` matcher); ``StopWhen`` ends generation when a callable says so (cancellation,
checked before each new token); ``Deadline`` ends it after a number of seconds. Each
remembers whether it fired, so the caller can tell why generation ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next to -inf (batch size 1).

    On each call it first feeds the matcher the token chosen at the previous step (the last
    of ``input_ids``, once past the prompt), then asks for the next mask. Once the grammar is
    complete only the end-of-sequence token is allowed, so generation stops by itself.
    """

    def __init__(self, matcher, prompt_length: int):
        self.matcher = matcher
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_length:
            token = int(input_ids[0, -1])
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the layout grammar rejected token {token}: {self.matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        vocab = scores.shape[-1]
        allowed = np.zeros(vocab, dtype=bool)
        allowed[: min(vocab, bits.size)] = bits[:vocab].astype(bool)
        blocked = torch.from_numpy(~allowed).to(scores.device)
        return scores.masked_fill(blocked.unsqueeze(0), float("-inf"))


class StopWhen(StoppingCriteria):
    """Stops generation when ``should_stop()`` returns True; ``fired`` says it did."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if not self.fired and self.should_stop():
            self.fired = True
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class Deadline(StopWhen):
    """Stops generation ``seconds`` after it was created."""

    def __init__(self, seconds: float):
        ends = time.monotonic() + seconds
        super().__init__(lambda: time.monotonic() >= ends)
