"""`dreambooth submit --caption` (cli/captioning.py) on the fake VLM: the local photos get .txt sidecars with the
subject text ("sks toy") in every caption, existing sidecars are kept unless overwritten, and a job without a VLM or
an endpoint that does not answer stops the submit before any sidecar is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreambooth_api import constants as api
from dreambooth_api.evaluation import VLM_API_KEY_ENV
from dreambooth_cli.captioning import CaptionReport, as_sidecar_job, caption_folder
from dreambooth_cli.errors import CliError, ExitStatus, InputError
from tests.infra.fake_vlm import FakeVlm, answer_text, error_reply, task_responder
from tests.infra.processes import free_port

CAPTION = "A toy lying on a red couch next to a window."


@pytest.fixture(scope="module")
def module_server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


@pytest.fixture
def server(module_server: FakeVlm) -> FakeVlm:
    module_server.reset(task_responder({"caption": json.dumps({"caption": CAPTION})}))
    return module_server


def job(base_url: str | None, **images: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"tiny": True},
        "instanceImages": {"uri": "s3://photos/toy/", "prompt": "a photo of sks toy", **images},
        "output": {"uri": "s3://models/toy"},
    }
    if base_url is not None:
        spec["vlm"] = {"baseUrl": base_url, "model": "m", "maxRetries": 0}
    return {"apiVersion": api.API_VERSION, "kind": api.JOB_KIND, "metadata": {"name": "toy"}, "spec": spec}


def photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 48), (40 * i, 200, 100)).save(folder / f"img-{i}.png")
    (folder / "notes.md").write_text("not a photo")
    return folder


def test_caption_writes_sidecars_with_the_subject_and_keeps_existing_ones(
    server: FakeVlm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VLM_API_KEY_ENV, "sk-user")
    folder = photos(tmp_path / "photos")
    (folder / "img-1.txt").write_text("my own caption of sks toy on a shelf\n")

    done = caption_folder(job(server.base_url, identifier="sks"), folder)

    assert done == CaptionReport(folder, written=2, kept=1, fallback=0)
    # As the trainer's captions: auto writes them: the class mention became the subject text.
    assert (folder / "img-0.txt").read_text() == "A sks toy lying on a red couch next to a window.\n"
    assert (folder / "img-1.txt").read_text() == "my own caption of sks toy on a shelf\n"
    assert (folder / "img-2.txt").read_text() == "A sks toy lying on a red couch next to a window.\n"
    assert not (folder / "notes.txt").exists()
    assert len(server.requests) == 2
    assert 'called exactly "sks toy"' in answer_text(server.requests[0].body)
    assert {r.headers["authorization"] for r in [*server.requests, *server.model_requests]} == {"Bearer sk-user"}

    again = caption_folder(job(server.base_url, identifier="sks"), folder, overwrite=True)
    assert again == CaptionReport(folder, written=3, kept=0, fallback=0)
    assert (folder / "img-1.txt").read_text() == "A sks toy lying on a red couch next to a window.\n"


def test_the_identifier_comes_from_the_class_prompt_too(server: FakeVlm, tmp_path: Path) -> None:
    folder = photos(tmp_path / "photos", count=1)
    manifest = job(server.base_url)
    manifest["spec"]["priorPreservation"] = {"enabled": True, "classPrompt": "a photo of a toy"}
    caption_folder(manifest, folder)
    assert (folder / "img-0.txt").read_text() == "A sks toy lying on a red couch next to a window.\n"


def test_the_submitted_job_trains_on_the_sidecars() -> None:
    manifest = job("http://127.0.0.1:1/v1", captions="auto", overwriteCaptions=True)
    as_sidecar_job(manifest)
    images = manifest["spec"]["instanceImages"]
    assert (images["captions"], "overwriteCaptions" in images) == ("sidecar", False)


def test_a_job_that_cannot_be_captioned_is_input_error(server: FakeVlm, tmp_path: Path) -> None:
    folder = photos(tmp_path / "photos", count=1)
    with pytest.raises(InputError, match=r"^toy\.yaml: --caption needs spec\.vlm"):
        caption_folder(job(None, identifier="sks"), folder, label="toy.yaml")
    with pytest.raises(InputError, match=r"--caption needs the identifier token"):
        caption_folder(job(server.base_url), folder)
    with pytest.raises(InputError, match=r"no images"):
        caption_folder(job(server.base_url, identifier="sks"), photos(tmp_path / "empty", count=0))
    assert server.requests == []


def test_an_endpoint_that_does_not_answer_stops_before_any_sidecar(server: FakeVlm, tmp_path: Path) -> None:
    folder = photos(tmp_path / "photos", count=2)
    server.script_models(error_reply(401, "Invalid API key"))
    with pytest.raises(CliError) as refused:
        caption_folder(job(server.base_url, identifier="sks"), folder)
    assert refused.value.status == ExitStatus.ERROR
    assert refused.value.message.endswith(f"refused the API key (HTTP 401): Invalid API key (the API key comes "
                                          f"from ${VLM_API_KEY_ENV})")  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(CliError, match=rf"^--caption: the VLM endpoint {dead} is unreachable"):
        caption_folder(job(dead, identifier="sks"), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["img-0.png", "img-1.png", "notes.md"]
