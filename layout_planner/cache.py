"""A cache of LLM answers keyed by everything that shapes them (docs/method.md §1.6).

The key hashes the template text, the model, the temperature, the max tokens, the
conversation (the prompt, or the turns and instruction of a revision) and the sample
index, so a template edit or a model switch never returns a stale answer (the reference
keyed on the prompt alone). The cached value is the LLM's raw answer text: it is small,
it is what the model said, and re-parsing it applies today's repair rules.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Protocol, runtime_checkable


@runtime_checkable
class LayoutCache(Protocol):
    """Anything with ``get``/``set`` of strings (the service supplies a Redis one)."""

    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str) -> None: ...


class InMemoryCache:
    """A bounded, thread-safe LRU cache held by one process."""

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def cache_key(
    template_sha256: str,
    model: str,
    temperature: float,
    max_tokens: int,
    conversation: list[dict[str, str]] | str,
    sample_index: int,
    mode: str = "chat",
) -> str:
    """``layout:<sha256>`` over the JSON of every input that changes the answer."""
    payload = json.dumps(
        {
            "template": template_sha256,
            "model": model,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "mode": mode,
            "conversation": conversation,
            "sample_index": sample_index,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return "layout:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
