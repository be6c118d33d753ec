"""What is asked of a vision-language model and what comes back: a task (content parts and the answer's model) and
a validated answer or the reason there is none. No I/O here: `captions` and the judge build tasks without importing
the client (or `openai`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from PIL import Image
from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)

Part = str | Image.Image
"""A content part: text, or an image (sent as a downscaled PNG data URL)."""


@dataclass(frozen=True)
class VlmTask(Generic[T]):
    """One question: the content parts in order (text and images) and the answer's model."""

    name: str
    """The schema's name in `response_format` (letters, digits, _ and -)."""
    parts: tuple[Part, ...]
    answer: type[T]


@dataclass(frozen=True)
class VlmAnswer(Generic[T]):
    """A validated answer, or None with the reason it is unknown."""

    value: T | None
    reason: str | None = None
    content: str | None = None
    """The last answer's `message.content` as received (for the logs)."""

    @property
    def ok(self) -> bool:
        return self.value is not None
