"""Instance-image captions by the VLM: the subject text in every caption, .txt sidecars, fallbacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dreambooth_api.evaluation import CaptionsSpec, VlmSpec
from dreambooth_api.vlm.captions import (
    CAPTION_TASK,
    clean_caption,
    ensure_subject,
    open_image,
    sidecar_uri,
    write_captions,
)
from dreambooth_api.vlm.client import VlmClient
from tests.infra.fake_vlm import FakeVlm, Reply, answer_text, error_reply, image_urls, vllm_reply


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a photo of sks dog lying on a red couch", "a photo of sks dog lying on a red couch"),
        ('"A photo of SKS Dog on the grass."', "A photo of sks dog on the grass."),
        ("Caption: a dog sleeping under a table", "a sks dog sleeping under a table"),
        ("sks sitting on a wooden floor", "sks dog sitting on a wooden floor"),
        ("a corgi on the beach at sunset", "sks dog, a corgi on the beach at sunset"),
        ("two dogs playing; the dog on the left", "two dogs playing; the sks dog on the left"),
        ("(sks dog) on a sofa", "sks dog, (sks dog) on a sofa"),  # "(sks" is no word of its own
        ("", "sks dog"),
        ("a   photo\nof a\tdog", "a photo of a sks dog"),
    ],
)
def test_ensure_subject(caption: str, expected: str) -> None:
    assert ensure_subject(caption, "sks dog") == expected


def test_ensure_subject_with_an_explicit_identifier_and_word_limit() -> None:
    assert (
        ensure_subject("a toy on a shelf", "zwx stuffed toy", identifier="zwx") == "zwx stuffed toy, a toy on a shelf"
    )
    assert ensure_subject("a stuffed toy on a shelf", "zwx stuffed toy") == "a zwx stuffed toy on a shelf"
    assert ensure_subject("one two three four five dog", "sks dog", max_words=3) == "sks dog, one two three"


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=120), st.sampled_from(["sks dog", "zwx stuffed animal", "sks", "ohwx man"]))
def test_fuzz_every_caption_names_the_subject(caption: str, subject: str) -> None:
    out = ensure_subject(caption, subject, max_words=40)
    assert subject in out
    assert subject.split()[0] in out.split()  # what the trainer's caption check looks for
    assert "\n" not in out
    assert len(out.split()) <= 40 + len(subject.split())


def test_clean_caption_and_sidecar_uri() -> None:
    assert clean_caption("  “a dog”  ") == "a dog"
    assert clean_caption("Description: 'x y z'", max_words=2) == "x y"
    assert sidecar_uri("s3://bucket/subject/img 1.jpeg") == "s3://bucket/subject/img 1.txt"
    assert sidecar_uri("file:///data/a.b/photo.PNG") == "file:///data/a.b/photo.txt"


@pytest.fixture(scope="module")
def module_server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


@pytest.fixture
def server(module_server: FakeVlm) -> FakeVlm:
    module_server.reset()
    return module_server


class FileStore:
    """The SidecarStore protocol over file:// URIs (the trainer's is its ObjectStore, the CLI's its folder)."""

    def read_bytes(self, uri: str) -> bytes:
        return Path(uri.removeprefix("file://")).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        Path(uri.removeprefix("file://")).write_bytes(data)

    def exists(self, uri: str) -> bool:
        return Path(uri.removeprefix("file://")).exists()


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    uris = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (1200, 900), (40 * i, 80, 120)).save(path)
        uris.append(path.as_uri())
    return uris


def _caption_reply(body: dict[str, Any]) -> Reply:
    assert body["response_format"]["json_schema"]["name"] == CAPTION_TASK
    return vllm_reply('{"caption": "A dog lying on a red couch next to a window."}')


def test_write_captions_keeps_existing_sidecars(server: FakeVlm, tmp_path: Path) -> None:
    uris = _images(tmp_path / "subject", 3)
    (tmp_path / "subject" / "img1.txt").write_text("my own caption of sks dog\n")
    server.reset(responder=_caption_reply)
    spec = CaptionsSpec(instruction="Mention the furniture.")
    with VlmClient(VlmSpec(base_url=server.base_url, model="m", max_image_side=256)) as client:
        outcomes = write_captions(client, FileStore(), uris, "sks dog", spec, fallback="a photo of sks dog")

    assert [o.source for o in outcomes] == ["vlm", "existing", "vlm"]
    assert outcomes[1].caption == "my own caption of sks dog"
    expected = "A sks dog lying on a red couch next to a window."
    assert (tmp_path / "subject" / "img0.txt").read_text() == expected + "\n"
    assert (tmp_path / "subject" / "img1.txt").read_text() == "my own caption of sks dog\n"
    assert len(server.requests) == 2
    body = server.requests[0].body
    text = answer_text(body)
    assert 'called exactly "sks dog"' in text
    assert "specific dog" in text
    assert "at most 40 words" in text
    assert "Mention the furniture." in text
    [url] = image_urls(body)
    assert url.startswith("data:image/png;base64,")


def test_overwrite_and_fallback(server: FakeVlm, tmp_path: Path) -> None:
    uris = _images(tmp_path / "subject", 2)
    (tmp_path / "subject" / "img0.txt").write_text("old caption\n")
    server.script(vllm_reply('{"caption": "sks dog in the snow"}'))
    server.reset(responder=lambda _body: error_reply(500, "down"))
    server.script(vllm_reply('{"caption": "sks dog in the snow"}'))
    spec = CaptionsSpec(overwrite=True)
    with VlmClient(VlmSpec(base_url=server.base_url, model="m", max_retries=0, max_concurrency=1)) as client:
        outcomes = write_captions(client, FileStore(), uris, "sks dog", spec, fallback="a photo of sks dog")
    assert [(o.source, o.caption) for o in outcomes] == [("vlm", "sks dog in the snow"),
                                                          ("fallback", "a photo of sks dog")]  # fmt: skip
    assert outcomes[1].reason == "the VLM endpoint answered HTTP 500: Error code: 500 - down"
    assert (tmp_path / "subject" / "img0.txt").read_text() == "sks dog in the snow\n"
    assert (tmp_path / "subject" / "img1.txt").read_text() == "a photo of sks dog\n"


def test_open_image_names_what_it_cannot_decode() -> None:
    with pytest.raises(ValueError, match=r"^notes\.png is not a decodable image"):
        open_image(b"not an image", "notes.png")
