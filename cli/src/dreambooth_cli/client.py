"""A typed Python client for DreamBoothJobs: what the `dreambooth` command does, for an app backend or a notebook.

    client = DreamBoothClient()  # kubeconfig, context and namespace chosen as kubectl chooses them
    name = client.submit("job.yaml", images="photos/")
    for job in client.watch(name):
        print(job.phase, job.progress.describe())
    client.generate("dog-server", "a photo of sks dog", "out/", subject=name, n=4)  # an InferenceService

The commands of `app.py` are a thin layer over it. It connects on first use. Every failure raises a `CliError`
(`InputError`, `ApiError` and `WatchTimeoutError` are kinds of it) with a one-line `message` and the exit `status` the
command uses for it.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import codecs
import copy
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreambooth_api import constants as api
from dreambooth_cli import evaluate as evaluation
from dreambooth_cli import images, kube, localrun, manifest, present
from dreambooth_cli.errors import ApiError, CliError, ExitStatus, InputError
from dreambooth_cli.jobinfo import JobInfo
from dreambooth_cli.report import load_run, write_report
from dreambooth_cli.sync import collect_images

if TYPE_CHECKING:
    from dreambooth_cli.captioning import CaptionReport

log = logging.getLogger(__name__)

WATCH_RETRY_SECONDS = 300.0
"""Without a timeout, `watch` gives up after this long without one successful read."""
WATCH_INTERVAL_SECONDS = 2.0
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""Kubernetes' label (and annotation) on the pods of an Indexed Job: the node rank of a DreamBoothJob's pod."""


@dataclass(frozen=True)
class Upload:
    """What `submit` uploaded: files new or changed below `uri`, and those already there with the same content."""

    uri: str
    uploaded: int
    unchanged: int


class WatchTimeoutError(CliError):
    """`watch` reached its timeout before the job succeeded or failed."""


def submit_error(source: Path | str, job: str, err: ApiError, *, dry_run: bool) -> CliError:
    """What a failed create means: 400/422 is invalid input, 409 an existing job, anything else as it is."""
    if err.http_status in (400, 422):
        check = "dry run; CRD schema and rules" if dry_run else "CRD schema and rules"
        return InputError(f"{source}: rejected by the API server ({check}): {err.message}")
    if err.http_status == 409:
        return CliError(
            f"{api.JOB_KIND} {job} already exists (delete it first, or change metadata.name)",
            ExitStatus.ALREADY_EXISTS,
        )
    return err


def _log_retry(name: str) -> Callable[[ApiError, float], None]:
    def retrying(err: ApiError, delay: float) -> None:
        log.warning("%s: %s; retrying in %gs", name, err.message, delay)

    return retrying


class DreamBoothClient:
    """DreamBoothJobs on one cluster: submit (with photos), get, list, watch, logs, evaluate and report.

    `kubeconfig`, `context` and `namespace` mean what kubectl's flags mean: without a kubeconfig, $KUBECONFIG or
    ~/.kube/config is read, else the in-cluster service account; the namespace defaults to the context's.
    """

    def __init__(
        self, kubeconfig: str | Path | None = None, context: str | None = None, namespace: str | None = None
    ) -> None:
        self.kubeconfig = Path(kubeconfig) if kubeconfig is not None else None
        self.context = context
        self._namespace = namespace
        self._target: kube.Target | None = None

    def connect(self) -> DreamBoothClient:
        """Load the kubeconfig now (otherwise the first call does); a CliError with status NO_CLUSTER if unusable."""
        if self._target is None:
            self._target = kube.connect(self.kubeconfig, self.context, self._namespace)
        return self

    @property
    def target(self) -> kube.Target:
        """The API client and namespace (connects on first use)."""
        self.connect()
        assert self._target is not None
        return self._target

    @property
    def namespace(self) -> str:
        """The namespace that get, list, watch, logs and report use."""
        return self.target.namespace

    def namespace_for(self, job: Mapping[str, Any]) -> str:
        """Where `submit` creates a job: the client's namespace if given, else the manifest's, else the context's."""
        return self._namespace or (job.get("metadata") or {}).get("namespace") or self.namespace

    def submit(
        self,
        job: str | Path | Mapping[str, Any],
        images: str | Path | None = None,
        *,
        on_upload: Callable[[Upload], None] | None = None,
        source: str | Path | None = None,
        check_input: bool = True,
        caption: bool = False,
        overwrite_captions: bool = False,
        on_caption: Callable[[CaptionReport], None] | None = None,
    ) -> str:
        """Create a DreamBoothJob (a YAML file or a manifest) and return its name.

        A server-side dry run (strict field validation) checks it first; then, with `caption`, the job's spec.vlm
        captions the photos in the folder `images` as the trainer's `captions: auto` would, writing .txt sidecars
        next to them (an existing one is kept unless `overwrite_captions`; captioning.py), `on_caption` hears how
        many, and the job is created with `instanceImages.captions: sidecar`; then the photos (and sidecars) are
        uploaded to spec.instanceImages.uri (an s3:// prefix), skipping those already there with the same
        checksum, and `on_upload` hears how many; then, with `check_input`, the images' bucket must exist and their
        prefix hold images (preflight.py; an InputError otherwise, a logged note when it cannot be checked from
        here); then the job is created. `source` names the manifest in errors.
        """
        if isinstance(job, Mapping):
            manifest_ = copy.deepcopy(dict(job))
            errors = manifest.check_envelope(manifest_)
            label = source or f"{api.JOB_KIND} {(manifest_.get('metadata') or {}).get('name', '?')}"
            if errors:
                raise InputError(f"{label}: {'; '.join(errors)}")
        else:
            manifest_ = manifest.load_job_manifest(Path(job))
            label = source or job
        target = replace(self.target, namespace=self.namespace_for(manifest_))
        manifest_["metadata"]["namespace"] = ns = target.namespace
        name = str(manifest_["metadata"]["name"])
        create = target.custom.create_namespaced_custom_object
        args = (api.GROUP, api.VERSION, ns, api.JOB_PLURAL, manifest_)
        # Strict: an unknown or misspelled field is an error, not silently pruned (kubectl apply does the same).
        try:
            kube.call(target, create, *args, dry_run="All", field_validation="Strict")
        except ApiError as err:
            raise submit_error(label, f"{ns}/{name}", err, dry_run=True) from err
        if caption:
            if images is None:
                raise InputError("--caption needs --images (the local photos to caption before the upload)")
            from dreambooth_cli import captioning

            folder = Path(images)
            captioned = captioning.caption_folder(manifest_, folder, overwrite=overwrite_captions, label=str(label))
            captioning.as_sidecar_job(manifest_)
            if on_caption is not None:
                on_caption(captioned)
        if images is not None:
            upload = self._upload_images(target, manifest_, Path(images))
            if on_upload is not None:
                on_upload(upload)
        if check_input:
            from dreambooth_cli import preflight

            note = preflight.check_job(target, manifest_)
            if note:
                log.warning("%s", note)
        try:
            kube.call(target, create, *args, field_validation="Strict")
        except ApiError as err:
            raise submit_error(label, f"{ns}/{name}", err, dry_run=False) from err
        return name

    @staticmethod
    def _upload_images(target: kube.Target, job: dict[str, Any], folder: Path) -> Upload:
        from dreambooth_cli import s3

        uri = job["spec"].get("instanceImages", {}).get("uri")
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise InputError("--images needs spec.instanceImages.uri to be an s3:// prefix")
        uploaded, skipped = s3.upload_images(s3.client_for_job(target, job), collect_images(folder), uri)
        return Upload(uri, uploaded, skipped)

    def get(self, name: str) -> JobInfo:
        """One job; a CliError with status NOT_FOUND when there is none of that name."""
        return JobInfo.from_object(kube.get_job(self.target, name), self.namespace)

    def list(self, all_namespaces: bool = False) -> builtins.list[JobInfo]:
        """The jobs of the namespace (or of every namespace), sorted by namespace and name."""
        jobs = [JobInfo.from_object(j) for j in kube.list_jobs(self.target, all_namespaces)]
        return sorted(jobs, key=lambda j: (j.namespace, j.name))

    def watch(
        self,
        name: str,
        *,
        timeout: float | None = None,
        interval: float = WATCH_INTERVAL_SECONDS,
        on_retry: Callable[[ApiError, float], None] | None = None,
    ) -> Iterator[JobInfo]:
        """The job read every `interval` seconds, until (and including) the read that finds it Succeeded or Failed.

        Connection errors, 429 and 5xx are retried with backoff (`on_retry` hears of each; by default they are
        logged) until `timeout`, or for WATCH_RETRY_SECONDS without one. After `timeout` seconds a WatchTimeoutError
        is raised. A failed job is yielded like a succeeded one: look at `.failed` and `.failure_message`.
        """
        target = self.target
        retrying = on_retry or _log_retry(name)
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            give_up_at = deadline if deadline is not None else time.monotonic() + WATCH_RETRY_SECONDS
            job = JobInfo.from_object(
                kube.retry_transient(
                    lambda: kube.get_job(target, name),
                    give_up_at=give_up_at,
                    on_retry=retrying,
                    clock=time.monotonic,
                    sleep=time.sleep,
                ),
                target.namespace,
            )
            yield job
            if job.terminal:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise WatchTimeoutError(f"{name} still {job.phase} after {timeout:g}s")
            time.sleep(interval)

    def logs(self, name: str, rank: int = 0, follow: bool = False) -> Iterator[str]:
        """The trainer log of one rank's pod (of the newest attempt), line by line with their line ends; for rank 0
        of a job with no training pod, the input check's log (the pre-flight pod, `<name>-check`).

        The pod is looked up at once (a CliError with status NOT_FOUND when there is none yet); with `follow` the
        lines keep coming until the pod ends. Iterate to the end, or close() the iterator, to free the connection.
        """
        target = self.target
        job = kube.get_job(target, name)
        nodes = int((job.get("spec", {}).get("resources") or {}).get("nodes") or 1)
        if not 0 <= rank < nodes:
            ranks = "rank 0" if nodes == 1 else f"ranks 0-{nodes - 1}"
            raise CliError(f"{name} has {nodes} node(s): {ranks} (not {rank})", ExitStatus.INVALID_INPUT)
        pods = kube.call(
            target, target.core.list_namespaced_pod, target.namespace, label_selector=f"{api.LABEL_JOB_NAME}={name}"
        ).items
        mine = [p for p in pods if _rank_of(p) == str(rank)]
        if not mine and rank == 0:
            # No training pod yet (or never: the input check failed the job): the input check's log tells why.
            mine = [p for p in pods if (p.metadata.labels or {}).get(api.LABEL_COMPONENT) == api.Component.PREFLIGHT]
        if not mine:
            raise CliError(f"no pod of {name} with rank {rank} yet (found {len(pods)} pods)", ExitStatus.NOT_FOUND)
        pod = max(mine, key=_newest)
        response = kube.call(
            target,
            target.core.read_namespaced_pod_log,
            pod.metadata.name,
            target.namespace,
            container=pod.spec.containers[0].name,
            follow=follow,
            _preload_content=False,
            _request_timeout=None if follow else kube.REQUEST_TIMEOUT_SECONDS,
        )
        return _lines(response)

    def generate(
        self,
        name: str,
        prompt: str,
        output: str | Path,
        *,
        subject: str | None = None,
        n: int = 1,
        size: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        negative_prompt: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = images.GENERATE_TIMEOUT_SECONDS,
        on_wait: Callable[[str], None] | None = None,
    ) -> builtins.list[images.GeneratedImage]:
        """Generate `n` images with the InferenceService `name` (of `subject`, a LoRA subject such as a DreamBoothJob's
        name, else the base model) and write them as PNGs into the folder `output`.

        The request goes through the Kubernetes API server's service proxy (as `kubectl port-forward` would reach the
        Service, with the kubeconfig's credentials), or straight to `url` (the service's base URL: its status.url
        inside the cluster, or a port-forward's `http://localhost:PORT`). The bearer token is `token`, else the one
        in the service's auth Secret when the kubeconfig may read it (with `url` and no cluster, none). A full queue
        (429) or a server still loading (503) is waited out until `timeout`, and `on_wait` hears of each wait.
        """
        body: dict[str, Any] = {"prompt": prompt, "n": n, "response_format": "b64_json"}
        optional = {"model": subject, "size": size, "seed": seed, "num_inference_steps": steps}
        body |= {k: v for k, v in optional.items() if v is not None}
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        deadline = time.monotonic() + timeout
        if url is None:
            service = self._inference_service(name)
            key = token or self._service_token(service)

            def post() -> images.Answer:
                return images.post_through_api_server(self.target, name, body, key, deadline)

        else:
            key = token or self._token_if_known(name)

            def post() -> images.Answer:
                return images.post_direct(url, body, key, deadline)

        while True:
            answer = post()
            if answer.status == 200:
                break
            message = images.error_message(answer)
            wait = images.retry_after(answer.headers)
            if answer.status not in images.RETRY_STATUSES or time.monotonic() + wait > deadline:
                raise images.generate_error(name, answer.status, message)
            if on_wait is not None:
                on_wait(f"{name}: {message}; retrying in {wait:g}s")
            time.sleep(wait)
        return images.write_images(answer.body, Path(output), subject or name)

    def _inference_service(self, name: str) -> dict[str, Any]:
        target = self.target
        try:
            found: dict[str, Any] = kube.call(
                target,
                target.custom.get_namespaced_custom_object,
                api.GROUP,
                api.VERSION,
                target.namespace,
                api.INFERENCE_PLURAL,
                name,
            )
        except CliError as err:
            if err.status == ExitStatus.NOT_FOUND:
                raise CliError(
                    f"{api.INFERENCE_KIND} {name!r} not found in namespace {target.namespace!r}", ExitStatus.NOT_FOUND
                ) from err
            raise
        return found

    def _token_if_known(self, name: str) -> str | None:
        """The service's token when the cluster knows the service; None without a cluster or such a service."""
        try:
            return self._service_token(self._inference_service(name))
        except CliError as err:
            if err.status in (ExitStatus.NO_CLUSTER, ExitStatus.NOT_FOUND):
                return None
            raise

    def _service_token(self, service: Mapping[str, Any]) -> str | None:
        """The token in the service's auth Secret (spec.auth.bearerTokenSecret), or None without auth."""
        ref = ((service.get("spec") or {}).get("auth") or {}).get("bearerTokenSecret")
        if not ref:
            return None
        target = self.target
        secret_name, key = str(ref.get("name")), str(ref.get("key") or "token")
        try:
            secret = kube.call(target, target.core.read_namespaced_secret, secret_name, target.namespace)
        except ApiError as err:
            raise CliError(
                f"{service['metadata']['name']} needs a bearer token: pass --token (reading the Secret {secret_name}"
                f" failed: {err.message})",
                ExitStatus.ERROR,
            ) from err
        value = (secret.data or {}).get(key)
        if not value:
            raise CliError(f"the Secret {secret_name} has no key {key!r}: pass --token", ExitStatus.ERROR)
        try:
            return base64.b64decode(value).decode().strip()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise CliError(f"the Secret {secret_name}'s key {key!r} is not a token: pass --token") from err

    def evaluate(
        self,
        name: str,
        *,
        timeout: float | None = None,
        interval: float = WATCH_INTERVAL_SECONDS,
        on_progress: Callable[[str], None] | None = None,
    ) -> evaluation.Evaluation:
        """Evaluate a finished job's exported model again, in the cluster, and wait until the operator has served the
        request (it runs the Job `<name>-eval`): `dreambooth evaluate NAME`.

        The outcome is returned, not raised: `.outcome.ok`, `.outcome.reason` (Reevaluated, ReevaluationFailed, or
        ReevaluationNotPossible for a job that is not Succeeded or has no spec.evaluation) and `.outcome.message`;
        the new scores and the quality gate are in `.job`. `on_progress` hears the request's token and each new
        progress line of the operator. A request not served within `timeout` seconds raises a CliError.
        """
        target = self.target
        token = evaluation.new_token()
        evaluation.request(target, name, token)
        tell = on_progress or (lambda _line: None)
        tell(f"evaluation requested ({api.ANNOTATION_EVALUATE}={token})")
        shown = ""
        last: JobInfo | None = None
        for job in evaluation.wait(target, name, token, timeout=timeout, interval=interval):
            line = evaluation.progress_line(job.raw, token)
            if line != shown:
                tell(line)
                shown = line
            last = job
        assert last is not None  # wait yields at least one read, or raises
        served = evaluation.outcome(last.raw, token)
        assert served is not None  # wait returns once the request is served
        return evaluation.Evaluation(token, last, served)

    def report(self, name: str, output: str | Path | None = None) -> Path:
        """Write the job's self-contained HTML report (from its outputs in storage) to `output`; returns the path.

        The default path is `<name>-report.html`. s3:// outputs are read with the AWS_* environment's credentials,
        else with the job's spec.storage.credentialsSecret.
        """
        from dreambooth_cli import s3

        target = self.target
        job = kube.get_job(target, name)
        uri = str(job.get("spec", {}).get("output", {}).get("uri", ""))
        destination = Path(output) if output is not None else Path(f"{name}-report.html")
        gpu_time = present.usage_text(present.status_of(job).get("usage"))
        with tempfile.TemporaryDirectory(prefix="dreambooth-report-") as tmp:
            if uri.startswith("file://"):
                run_dir = localrun.uri_to_path(uri)
            else:
                run_dir = s3.download_run(s3.client_for_job(target, job), uri, Path(tmp))
            return write_report(replace(load_run(run_dir), gpu_time=gpu_time), destination, title=name)


def _rank_of(pod: Any) -> str | None:
    meta = pod.metadata
    return (meta.labels or {}).get(COMPLETION_INDEX) or (meta.annotations or {}).get(COMPLETION_INDEX)


def _newest(pod: Any) -> tuple[int, datetime]:
    attempt = (pod.metadata.labels or {}).get(api.LABEL_ATTEMPT, "0")
    created = pod.metadata.creation_timestamp or datetime.min.replace(tzinfo=UTC)
    return (int(attempt) if str(attempt).isdigit() else 0, created)


def _lines(response: Any) -> Iterator[str]:
    """The lines of a streamed HTTP body, decoded as UTF-8 (bad bytes replaced), each with its line end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    try:
        for chunk in response.stream(4096):
            pending += decoder.decode(chunk)
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line + "\n"
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
    finally:
        response.release_conn()
