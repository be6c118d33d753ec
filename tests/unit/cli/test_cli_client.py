"""DreamBoothClient, the typed Python client under the commands, against a fake API (no cluster)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes import client

from dreambooth_api import constants as api
from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_cli import kube
from dreambooth_cli.client import COMPLETION_INDEX, DreamBoothClient, WatchTimeoutError, _lines
from dreambooth_cli.errors import ApiError, CliError, ExitStatus, InputError
from dreambooth_cli.jobinfo import JobInfo

NOW = "2026-11-27T00:00:00Z"


def job(name: str = "toy", namespace: str = "ns", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.JOB_KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "instanceImages": {"uri": "s3://b/photos/", "prompt": "a photo of sks toy"},
            "training": {"maxSteps": 20},
            "output": {"uri": "s3://b/out"},
        },
        "status": status,
    }


@pytest.fixture
def target(monkeypatch: pytest.MonkeyPatch) -> kube.Target:
    """kube.connect answers a fake target in namespace `ns` (the context's)."""
    fake = kube.Target(client.ApiClient(client.Configuration()), "ns", "https://127.0.0.1:1")
    connects: list[tuple[Any, ...]] = []

    def connect(*args: Any) -> kube.Target:
        connects.append(args)
        return fake if args[2] is None else kube.Target(fake.api_client, args[2], fake.host)

    monkeypatch.setattr(kube, "connect", connect)
    return fake


def test_job_info_reads_the_status() -> None:
    failed = JobInfo.from_object(
        job(
            phase="Failed",
            progress={"step": 5, "totalSteps": 20, "loss": 0.5},
            conditions=[
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "InvalidInput",
                    "message": "img-2.png is not an image",
                    "lastTransitionTime": NOW,
                }
            ],
        )
    )
    assert (failed.name, failed.namespace, failed.phase) == ("toy", "ns", "Failed")
    assert (failed.terminal, failed.failed, failed.succeeded) == (True, True, False)
    assert failed.progress.describe() == "step 5/20 loss 0.5000"
    assert failed.failure_message == "InvalidInput: img-2.png is not an image"
    assert isinstance(failed.status, DreamBoothJobStatus)
    assert failed.status.phase == api.JobPhase.FAILED
    assert failed.status.conditions[0].reason == "InvalidInput"

    done = JobInfo.from_object(job(phase="Succeeded", outputs={"modelUri": "s3://b/out/model"}))
    assert (done.succeeded, done.model_uri) == (True, "s3://b/out/model")
    new = JobInfo.from_object({"metadata": {"name": "fresh"}, "spec": {"training": {"maxSteps": 8}}}, "team")
    assert (new.namespace, new.phase, new.terminal, new.model_uri) == ("team", "Pending", False, None)
    assert new.progress.total_steps == 8
    assert new.status == DreamBoothJobStatus()


def test_it_connects_on_first_use_and_once(target: kube.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(kube, "get_job", lambda _, name: calls.append(name) or job(name))
    dbc = DreamBoothClient(kubeconfig="kc.yaml", context="ml")
    assert dbc.get("a").name == "a"
    assert dbc.get("b").namespace == "ns"
    assert dbc.namespace == "ns"
    assert calls == ["a", "b"]
    assert dbc.kubeconfig == Path("kc.yaml")


def test_list_is_sorted_by_namespace_and_name(target: kube.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def list_jobs(_: kube.Target, all_namespaces: bool = False) -> list[dict[str, Any]]:
        seen.append(all_namespaces)
        return [job("b", "y"), job("a", "y"), job("z", "x")]

    monkeypatch.setattr(kube, "list_jobs", list_jobs)
    listed = DreamBoothClient().list(all_namespaces=True)
    assert [(j.namespace, j.name) for j in listed] == [("x", "z"), ("y", "a"), ("y", "b")]
    assert seen == [True]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_watch_yields_every_read_until_the_job_ends(target: kube.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    replies: list[Any] = [
        job(phase="Running", progress={"step": 2, "totalSteps": 20}),
        ApiError("HTTP 503", ExitStatus.ERROR, 503),
        job(phase="Running", progress={"step": 9, "totalSteps": 20}),
        job(phase="Failed", message="out of memory"),
        job(phase="Running"),  # never read: the watch ends at the terminal phase
    ]

    def get_job(*_: Any) -> dict[str, Any]:
        reply = replies.pop(0)
        if isinstance(reply, ApiError):
            raise reply
        return dict(reply)

    clock = FakeClock()
    monkeypatch.setattr(kube, "get_job", get_job)
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(time, "monotonic", clock)
    retries: list[tuple[int | None, float]] = []
    events = list(
        DreamBoothClient().watch(
            "toy", interval=5, on_retry=lambda err, delay: retries.append((err.http_status, delay))
        )
    )
    assert [(e.phase, e.progress.step) for e in events] == [("Running", 2), ("Running", 9), ("Failed", 0)]
    assert events[-1].failure_message == "out of memory"
    assert retries == [(503, 1.0)]
    assert clock.sleeps == [5, 1.0, 5]
    assert len(replies) == 1


def test_watch_times_out(target: kube.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(kube, "get_job", lambda *_: job(phase="Queued"))
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(time, "monotonic", clock)
    with pytest.raises(WatchTimeoutError) as err:
        for _ in DreamBoothClient().watch("toy", timeout=10, interval=4):
            pass
    assert err.value.message == "toy still Queued after 10s"
    assert err.value.status == ExitStatus.ERROR


class FakeCustom:
    """create_namespaced_custom_object: records calls; answers an ApiError for the names in `fail`."""

    def __init__(self, fail: dict[tuple[str, bool], ApiError] | None = None) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.fail = fail or {}

    def create_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        group, version, ns, plural, body = args
        assert (group, version, plural) == (api.GROUP, api.VERSION, api.JOB_PLURAL)
        assert body["metadata"]["namespace"] == ns
        assert kwargs["field_validation"] == "Strict"
        dry_run = kwargs.get("dry_run") == "All"
        self.calls.append((ns, body["metadata"]["name"], dry_run))
        error = self.fail.get((body["metadata"]["name"], dry_run))
        if error is not None:
            raise error
        return dict(body)


@pytest.fixture
def custom(target: kube.Target, monkeypatch: pytest.MonkeyPatch) -> FakeCustom:
    fake = FakeCustom({("taken", False): ApiError("exists", ExitStatus.ERROR, 409)})
    monkeypatch.setattr(kube.Target, "custom", property(lambda _: fake))
    return fake


def test_submit_dry_runs_then_creates_in_the_right_namespace(custom: FakeCustom, tmp_path: Path) -> None:
    manifest = job("toy", namespace="from-manifest")
    del manifest["status"]
    assert DreamBoothClient().submit(manifest) == "toy"
    assert manifest["metadata"]["namespace"] == "from-manifest"  # the caller's dict is not changed
    path = tmp_path / "job.yaml"
    del manifest["metadata"]["namespace"]
    path.write_text(yaml.safe_dump(manifest))
    assert DreamBoothClient().submit(path) == "toy"
    assert DreamBoothClient(namespace="mine").submit(str(path)) == "toy"
    assert DreamBoothClient().namespace_for({"metadata": {"namespace": "x"}}) == "x"
    assert DreamBoothClient(namespace="mine").namespace_for({"metadata": {"namespace": "x"}}) == "mine"
    assert custom.calls == [
        ("from-manifest", "toy", True),
        ("from-manifest", "toy", False),
        ("ns", "toy", True),
        ("ns", "toy", False),
        ("mine", "toy", True),
        ("mine", "toy", False),
    ]


def test_submit_errors(custom: FakeCustom) -> None:
    taken = job("taken")
    with pytest.raises(CliError) as err:
        DreamBoothClient().submit(taken, source="taken.yaml")
    assert err.value.status == ExitStatus.ALREADY_EXISTS
    assert err.value.message == "DreamBoothJob ns/taken already exists (delete it first, or change metadata.name)"
    with pytest.raises(InputError) as bad:
        DreamBoothClient().submit({"apiVersion": api.API_VERSION, "kind": api.JOB_KIND, "metadata": {}})
    assert bad.value.message.startswith("DreamBoothJob ?: metadata.name: required field is missing")
    local = job("local")
    local["spec"]["instanceImages"]["uri"] = "file:///photos/"
    with pytest.raises(InputError) as no_s3:
        DreamBoothClient().submit(local, images="photos")
    assert no_s3.value.message == "--images needs spec.instanceImages.uri to be an s3:// prefix"
    assert ("local", False) not in {(name, dry) for _, name, dry in custom.calls}  # nothing created


def pod(name: str, rank: int, attempt: int, created: int) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=name,
            labels={COMPLETION_INDEX: str(rank), api.LABEL_ATTEMPT: str(attempt)},
            annotations={},
            creation_timestamp=datetime(2026, 1, 1, 0, created, tzinfo=UTC),
        ),
        spec=SimpleNamespace(containers=[SimpleNamespace(name="trainer")]),
    )


class FakeResponse:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.released = False

    def stream(self, _: int) -> list[bytes]:
        return self.chunks

    def release_conn(self) -> None:
        self.released = True


def test_logs_reads_the_newest_attempt_of_the_rank(target: kube.Target, monkeypatch: pytest.MonkeyPatch) -> None:
    pods = [pod("a0-r0", 0, 0, 1), pod("a1-r0", 0, 1, 2), pod("a1-r1", 1, 1, 3), pod("a9-r1", 1, 9, 0)]
    response = FakeResponse([b"step 1\nst", b"ep 2\n\xc3", b"\xa9t\xc3\xa9 ", b"\xff no newline"])
    read: list[tuple[str, dict[str, Any]]] = []

    def call(_: kube.Target, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn.__name__ == "list_namespaced_pod":
            assert kwargs["label_selector"] == f"{api.LABEL_JOB_NAME}=toy"
            return SimpleNamespace(items=pods)
        read.append((args[0], kwargs))
        return response

    three_nodes = job()
    three_nodes["spec"]["resources"] = {"nodes": 3}
    monkeypatch.setattr(kube, "get_job", lambda *_: three_nodes)
    monkeypatch.setattr(kube, "call", call)
    dbc = DreamBoothClient()
    assert list(dbc.logs("toy")) == ["step 1\n", "step 2\n", "été \ufffd no newline"]
    assert response.released
    assert read[0][0] == "a1-r0"
    assert read[0][1]["container"] == "trainer"
    assert read[0][1]["follow"] is False
    list(dbc.logs("toy", rank=1, follow=True))
    assert read[1][0] == "a9-r1"
    assert read[1][1]["_request_timeout"] is None
    with pytest.raises(CliError) as err:
        dbc.logs("toy", rank=2)  # raised at the call, before any iteration
    assert err.value.status == ExitStatus.NOT_FOUND
    assert err.value.message == "no pod of toy with rank 2 yet (found 4 pods)"
    with pytest.raises(CliError) as err:
        dbc.logs("toy", rank=3)  # the job has ranks 0-2: a clear answer instead of "no pod yet"
    assert err.value.status == ExitStatus.INVALID_INPUT
    assert err.value.message == "toy has 3 node(s): ranks 0-2 (not 3)"


def test_lines_of_an_empty_body() -> None:
    response = FakeResponse([])
    assert list(_lines(response)) == []
    assert response.released


def test_logs_of_a_job_stopped_by_its_input_check_are_the_check_pods(
    target: kube.Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = pod("toy-check-x", 0, 0, 1)
    check.metadata.labels = {api.LABEL_COMPONENT: api.Component.PREFLIGHT}
    read: list[str] = []

    def call(_: kube.Target, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn.__name__ == "list_namespaced_pod":
            return SimpleNamespace(items=[check])
        read.append(args[0])
        return FakeResponse([b"bucket nope does not exist\n"])

    monkeypatch.setattr(kube, "get_job", lambda *_: job())
    monkeypatch.setattr(kube, "call", call)
    assert list(DreamBoothClient().logs("toy")) == ["bucket nope does not exist\n"]
    assert read == ["toy-check-x"]
