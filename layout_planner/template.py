"""Our prompt template and its in-context examples, versioned (docs/method.md §1.1).

The template text lives in ``templates/<version>.txt`` (package data). Its SHA-256 is part
of every cache key (§1.6), so editing the text invalidates cached answers by itself.
The conversation is the same for chat and completions endpoints: the template, then
``Caption: ...`` / ``Layout: ...`` pairs, then ``Instruction: ...`` / ``Layout: ...`` pairs
for revisions (§1.7).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from layout_planner.layout import GRID

TEMPLATE_VERSION = "layout_v1"

CAPTION_PREFIX = "Caption: "
INSTRUCTION_PREFIX = "Instruction: "
LAYOUT_PREFIX = "Layout:"
# Completions mode: stop before the model invents the next example.
COMPLETION_STOP = ["\nCaption:", "\nInstruction:"]

# The JSON shape of an answer (response_format json_schema, §1.2). Boxes are [x, y, w, h].
LAYOUT_JSON_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "phrase": {"type": "string"},
                    "box": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
                },
                "required": ["id", "phrase", "box"],
                "additionalProperties": False,
            },
        },
        "background": {"type": "string"},
        "negative": {"type": "string"},
    },
    "required": ["objects", "background", "negative"],
    "additionalProperties": False,
}




def constrained_layout_schema(max_objects: int) -> dict:
    """A tighter answer schema for constrained decoding (the local planner): every answer it allows
    is a usable layout, and its length is bounded.

    On top of ``LAYOUT_JSON_SCHEMA``: at most ``max_objects`` objects; ids as the template
    writes them; a phrase starts with a letter; a box is [x, y, w, h] with x, y in 0..496 and
    w, h in 16..512 (repair clips what overhangs the canvas); the texts have length caps.
    Strings hold no escapes (set by the grammar options), so no control characters.
    """
    coordinate = {"type": "integer", "minimum": 0, "maximum": GRID - 16}
    size = {"type": "integer", "minimum": 16, "maximum": GRID}
    return {
        "type": "object",
        "properties": {
            "objects": {
                "type": "array",
                "maxItems": max_objects,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,23}$"},
                        "phrase": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9 ,.'()&/-]{0,79}$"},
                        "box": {
                            "type": "array",
                            "prefixItems": [coordinate, coordinate, size, size],
                            "items": False,
                            "minItems": 4,
                        },
                    },
                    "required": ["id", "phrase", "box"],
                    "additionalProperties": False,
                },
            },
            "background": {"type": "string", "maxLength": 300},
            "negative": {"type": "string", "maxLength": 200},
        },
        "required": ["objects", "background", "negative"],
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Template:
    version: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=4)
def load_template(version: str = TEMPLATE_VERSION) -> Template:
    """The packaged template ``version`` (read once per process)."""
    path = resources.files("layout_planner").joinpath("templates", f"{version}.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"unknown template version {version!r}") from None
    return Template(version=version, text=text.strip() + "\n")


def chat_messages(template: Template, exchanges: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    """Chat messages: the template as system text, then (user, assistant) exchanges, then the question.

    ``exchanges`` and ``question`` hold already-prefixed user lines (``Caption: ...``).
    """
    messages = [{"role": "system", "content": template.text}]
    for user, assistant in exchanges:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": question})
    return messages


def completion_prompt(messages: list[dict[str, str]]) -> str:
    """Flatten chat messages into one prompt for a base model, ending where the layout goes."""
    parts = [messages[0]["content"].rstrip()]
    for message in messages[1:]:
        if message["role"] == "user":
            parts.append(message["content"])
        else:
            parts.append(f"{LAYOUT_PREFIX} {message['content']}")
    return "\n\n".join(parts) + f"\n{LAYOUT_PREFIX}"
