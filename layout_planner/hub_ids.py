"""Whether a model setting names a Hugging Face hub repository or a local path.

Its own module, importing nothing heavy, so that stage 2's preflight checks can use it without
loading the LLM client (``openai``)."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(model: str) -> bool:
    """``owner/name`` that is not an existing directory; anything else is read as a path."""
    return bool(_HUB_ID.match(model)) and not Path(model).exists()
