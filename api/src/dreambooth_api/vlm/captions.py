"""Instance-image captions written by a vision-language model, stored as .txt sidecars next to the images.

A caption that describes the pose, background, lighting and other objects, and names the subject only by its
identifier and class ("a photo of sks dog lying on a red couch by a window"), lets training bind the identifier to
the subject's appearance instead of to the photos' backgrounds and poses.

Every caption is made to contain the subject text exactly (`ensure_subject`): the model's mention of the subject is
rewritten ("a dog", "Sks dog" -> "sks dog"), and the subject is put in front when it is missing, so that the
identifier is always a whitespace-separated word (what the trainer's caption check requires). An image whose caption
cannot be had from the VLM gets the instance prompt, with the reason reported; captioning never stops training.

The trainer (`captions: auto`, on object storage) and `dreambooth submit --caption` (on the user's folder, before
upload) run the same `write_captions`, so a caption is the same wherever it was written.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from dreambooth_api.config import InstanceImagesSpec
from dreambooth_api.evaluation import CaptionsSpec, split_subject, subject_from_prompt
from dreambooth_api.vlm.tasks import VlmAnswer, VlmTask

if TYPE_CHECKING:
    from dreambooth_api.vlm.client import VlmClient

CAPTION_TASK = "caption"
CAPTION_INSTRUCTION = (
    "Write a caption of this photo for fine-tuning a text-to-image model. The photo's main subject is a specific "
    '{kind} that must be called exactly "{subject}". Start with "a photo of {subject}", then describe what else is '
    "visible: the pose, the setting and background, the lighting, other objects and people. Do not describe the "
    "subject's own appearance (its colours, markings, shape): the name {subject} stands for it. One sentence, at "
    "most {max_words} words."
)
_QUOTES = "\"'`“”‘’"  # noqa: RUF001 - typographic quotes a model may wrap its caption in
_LABEL = re.compile(r"^\s*(caption|description)\s*:\s*", re.IGNORECASE)


class CaptionAnswer(BaseModel):
    """The captioner's answer."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})

    caption: str = Field(min_length=1, max_length=2000)


class SidecarStore(Protocol):
    """What captioning needs of the images' storage (the trainer's `ObjectStore` has it; the CLI's local folder)."""

    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None: ...

    def exists(self, uri: str) -> bool: ...


@dataclass(frozen=True)
class CaptionOutcome:
    """One image's caption and where it came from."""

    image: str
    caption: str
    source: Literal["existing", "vlm", "fallback"]
    reason: str | None = None
    """Why the fallback was used."""


ImageDecoder = Callable[[bytes, str], Image.Image]
"""Decodes an image's bytes (named by its URI in errors): the trainer passes its `decode_image` (which refuses
what training refuses); `open_image` is the default."""
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


def open_image(data: bytes, name: str) -> Image.Image:
    """A JPEG, PNG or WEBP image as RGB with its EXIF orientation applied (Pillow's decompression-bomb limit
    holds); a ValueError naming `name` when it is none."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name} is not a decodable image (jpg, jpeg, png, webp): {err}") from err


def identifier_tokens(spec: InstanceImagesSpec, class_prompt: str | None) -> list[str]:
    """The subject's identifier word(s): explicit, or the instance prompt's words that the class prompt lacks."""
    if spec.identifier:
        return [spec.identifier]
    if class_prompt:
        class_words = set(class_prompt.lower().split())
        words = [w for w in spec.prompt.split() if w.lower() not in class_words]
        if words:
            return words
    return []


def subject_and_identifier(spec: InstanceImagesSpec, class_prompt: str | None) -> tuple[str, str | None]:
    """What prompts call the subject ("sks dog") and its identifier ("sks"); the instance prompt itself when the
    identifier is unknown (no `identifier` and no class prompt)."""
    identifiers = identifier_tokens(spec, class_prompt)
    if not identifiers:
        return spec.prompt, None
    return subject_from_prompt(spec.prompt, identifiers[0]), identifiers[0]


def sidecar_uri(image_uri: str) -> str:
    """The caption's URI: the image's with its extension replaced by .txt (the rule of the trainer's reader)."""
    stem, _dot, _ext = image_uri.rpartition(".")
    return f"{stem}.txt"


def clean_caption(text: str, max_words: int | None = None) -> str:
    """One line: whitespace collapsed, a "Caption:" label and wrapping quotes dropped, cut to `max_words` words."""
    text = " ".join(text.split())
    text = _LABEL.sub("", text)
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    words = text.split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


def _phrase(words: str) -> re.Pattern[str]:
    """`words` as a case-insensitive pattern with any whitespace between them and no word character around."""
    body = r"\s+".join(re.escape(w) for w in words.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def ensure_subject(caption: str, subject: str, identifier: str | None = None, max_words: int | None = None) -> str:
    """`caption` with the subject text ("sks dog") in it, its identifier a word of its own.

    The subject (any case) is rewritten to `subject`; else the first mention of the identifier or of the class
    ("a dog") becomes the subject ("a sks dog"); else the subject is put in front ("sks dog, a red couch ...").
    """
    subject = " ".join(subject.split())
    ident, class_words = split_subject(subject, identifier)
    text = clean_caption(caption, max_words)
    whole = _phrase(subject)
    if whole.search(text):
        text = whole.sub(lambda _m: subject, text)
    else:
        for words in (ident, class_words):
            if words and (pattern := _phrase(words)).search(text):
                text = pattern.sub(lambda _m: subject, text, count=1)
                break
    if ident not in text.split() or subject not in text:
        # A comma glued to the identifier ("sks,") would hide it from the trainer's word check.
        separator = " - " if subject.split()[-1] == ident else ", "
        text = f"{subject}{separator}{text}" if text else subject
    return text


def caption_task(
    image: Image.Image, subject: str, spec: CaptionsSpec, identifier: str | None = None
) -> VlmTask[CaptionAnswer]:
    """The captioning question for one image."""
    _ident, class_words = split_subject(subject, identifier)
    text = CAPTION_INSTRUCTION.format(kind=class_words or "subject", subject=subject, max_words=spec.max_words)
    if spec.instruction:
        text += "\n" + spec.instruction
    return VlmTask(CAPTION_TASK, (text, image), CaptionAnswer)


def caption_images(
    client: VlmClient,
    images: Sequence[Image.Image],
    subject: str,
    spec: CaptionsSpec,
    identifier: str | None = None,
) -> list[tuple[str | None, str | None]]:
    """(caption, None) or (None, reason) for each image, in order; never raises."""
    answers: list[VlmAnswer[CaptionAnswer]] = client.ask_many(
        [caption_task(image, subject, spec, identifier) for image in images]
    )
    out: list[tuple[str | None, str | None]] = []
    for answer in answers:
        if answer.value is None:
            out.append((None, answer.reason))
        else:
            out.append((ensure_subject(answer.value.caption, subject, identifier, spec.max_words), None))
    return out


def write_captions(
    client: VlmClient,
    store: SidecarStore,
    image_uris: Sequence[str],
    subject: str,
    spec: CaptionsSpec,
    fallback: str,
    identifier: str | None = None,
    decode: ImageDecoder = open_image,
    recorded: Mapping[str, str] | None = None,
) -> list[CaptionOutcome]:
    """Caption every image that has no sidecar (every image with `overwrite`) and write the .txt sidecars.

    `fallback` (the instance prompt) is written for an image the VLM could not caption. An image that cannot be
    read or decoded raises what `decode` raises (the trainer's InvalidInputError, as training would).

    `recorded` is what an earlier attempt of the same run trained on ({image URI: caption}, the run's
    captions.json): with `overwrite`, an image whose sidecar still holds its recorded caption keeps it, so that a
    resumed run trains on the prompts its checkpoint was trained on (a VLM seldom writes the same caption twice).
    """
    recorded = recorded or {}
    outcomes: dict[str, CaptionOutcome] = {}
    todo: list[str] = []
    for uri in image_uris:
        sidecar = sidecar_uri(uri)
        if (not spec.overwrite or uri in recorded) and store.exists(sidecar):
            existing = " ".join(store.read_bytes(sidecar).decode("utf-8", errors="replace").split())
            if not spec.overwrite or existing == recorded[uri]:
                outcomes[uri] = CaptionOutcome(uri, existing, "existing")
                continue
        todo.append(uri)
    images = []
    for uri in todo:
        image = decode(store.read_bytes(uri), uri)
        image.thumbnail((client.spec.max_image_side, client.spec.max_image_side), Image.Resampling.LANCZOS)
        images.append(image)  # downscaled now: a dozen full-size photos would hold hundreds of MB
    for uri, (caption, reason) in zip(todo, caption_images(client, images, subject, spec, identifier), strict=True):
        if caption is None:
            outcome = CaptionOutcome(uri, fallback, "fallback", reason)
        else:
            outcome = CaptionOutcome(uri, caption, "vlm")
        store.write_bytes(sidecar_uri(uri), (outcome.caption + "\n").encode("utf-8"))
        outcomes[uri] = outcome
    return [outcomes[uri] for uri in image_uris]
