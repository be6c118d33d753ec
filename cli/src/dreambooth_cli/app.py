"""The `dreambooth` command (also `kubectl dreambooth`): run a job locally, or submit, watch and inspect jobs.

Every failure is one line on stderr and a non-zero exit status (see errors.ExitStatus); --debug adds the traceback.
"""

from __future__ import annotations

import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dreambooth_api import constants as api
from dreambooth_cli import evaluate as evaluation
from dreambooth_cli import localrun, manifest, present, subject
from dreambooth_cli.client import DreamBoothClient, Upload
from dreambooth_cli.display import ProgressDisplay
from dreambooth_cli.errors import ApiError, CliError, ExitStatus, InputError
from dreambooth_cli.events import format_log_event, parse_line
from dreambooth_cli.jobinfo import JobInfo
from dreambooth_cli.report import load_run, write_report
from dreambooth_cli.report.data import looks_like_run
from dreambooth_cli.sync import collect_images, sync_to_folder

if TYPE_CHECKING:
    from dreambooth_cli.captioning import CaptionReport

app = typer.Typer(
    name="dreambooth",
    help="Run DreamBooth fine-tuning jobs locally or on Kubernetes, and inspect them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (scripts, tests) is never wrapped: tables and paths stay one line each.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 4096)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 4096)

JobFile = Annotated[Path, typer.Argument(help="A DreamBoothJob YAML file.", show_default=False)]
Namespace = Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's).")]
Context = Annotated[str | None, typer.Option("--context", help="The kubeconfig context to use.")]
Kubeconfig = Annotated[Path | None, typer.Option("--kubeconfig", help="Path of the kubeconfig (default: $KUBECONFIG).")]
JobName = Annotated[str, typer.Argument(help="The DreamBoothJob's name.", show_default=False)]


def say(text: str) -> None:
    """One line on stdout, printed as it is (data may hold rich markup such as `[x]`)."""
    out.print(Text(text), soft_wrap=True)


@app.command()
def run(
    job_file: JobFile,
    local: Annotated[bool, typer.Option("--local", help="Run here, without a cluster (required).")] = False,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where storage, logs and the report go.")] = Path(
        ".dreambooth"
    ),
    tiny: Annotated[bool, typer.Option("--tiny", help="Use the tiny random model whatever the spec says.")] = False,
    images: Annotated[
        Path | None, typer.Option("--images", help="Copy these photos to spec.instanceImages.uri first.")
    ] = None,
) -> None:
    """Run a job on this machine: s3:// becomes file://WORKDIR/s3/..., progress is shown live, a report is written."""
    if not local:
        raise InputError("run needs --local (to run on a cluster use: dreambooth submit JOB.yaml)")
    job = manifest.load_job_manifest(job_file)
    note = manifest.check_schema(job_file, job)
    err_console.print(f"{job_file}: {note}", markup=False)
    config = localrun.local_trainer_config(job, workdir, tiny=tiny)
    if images is not None:
        copied, skipped = sync_to_folder(collect_images(images), localrun.instance_images_dir(config))
        err_console.print(f"images: {copied} copied, {skipped} already there", markup=False)
    with ProgressDisplay(err_console, description=job["metadata"]["name"]) as display:
        result = localrun.run_trainer(config, workdir, display)
    localrun.check_outcome(result)
    output = result.output_dir
    report = write_report(load_run(output), workdir / "report.html", title=str(job["metadata"]["name"]))
    say(f"model:   {output / 'model'}")
    say(f"samples: {output / 'samples'}")
    say(f"report:  {report}")
    say_evaluation(result.termination)


def say_evaluation(fields: dict[str, object]) -> None:
    """The evaluation's scores and gate from a result document (nothing when the run was not evaluated)."""
    scores = fields.get("evaluation")
    if isinstance(scores, dict):
        say("evaluation: " + ", ".join(f"{name} {value:.4g}" for name, value in sorted(scores.items())))
    if fields.get("qualityGate"):
        reason = fields.get("qualityGateReason")
        say(f"quality gate: {fields['qualityGate']}" + (f" ({reason})" if reason else ""))
    if fields.get("evaluationError"):
        say(f"evaluation error: {fields['evaluationError']}")


@app.command()
def submit(
    job_file: JobFile,
    images: Annotated[
        Path | None, typer.Option("--images", help="Upload these photos to spec.instanceImages.uri first.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="Check that spec.instanceImages' bucket exists and its prefix holds images before creating the job.",
        ),
    ] = True,
    caption: Annotated[
        bool,
        typer.Option(
            "--caption",
            help="Caption the --images photos with the job's spec.vlm first (.txt sidecars next to them, to read and "
            "edit; the API key from $DREAMBOOTH_VLM_API_KEY) and train on them (instanceImages.captions: sidecar).",
        ),
    ] = False,
    overwrite_captions: Annotated[
        bool, typer.Option("--overwrite-captions", help="With --caption, replace existing .txt sidecars too.")
    ] = False,
    namespace: Namespace = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Create a DreamBoothJob on the cluster (after a server-side dry run), uploading its photos first."""
    job = manifest.load_job_manifest(job_file)
    client = DreamBoothClient(kubeconfig, context, namespace)

    def captioned(done: CaptionReport) -> None:
        say(
            f"captions: {done.written} written by the VLM, {done.kept} kept, {done.fallback} the instance prompt"
            + (f" ({done.reason})" if done.reason else "")
            + f", as .txt files in {done.folder}"
        )
        say("captions: the job trains on them as they are (instanceImages.captions: sidecar); edit and submit again")

    def uploaded(upload: Upload) -> None:
        say(f"images: {upload.uploaded} uploaded, {upload.unchanged} unchanged, to {upload.uri}")

    name = client.submit(
        job,
        images,
        on_upload=uploaded,
        source=job_file,
        check_input=check,
        caption=caption,
        overwrite_captions=overwrite_captions,
        on_caption=captioned,
    )
    ns = client.namespace_for(job)
    say(f"{api.JOB_KIND} {ns}/{name} created. Next:")
    say(f"  kubectl get dbj {name} -n {ns}")
    say(f"  dreambooth watch {name} -n {ns}")
    say(f"  dreambooth logs {name} -n {ns} --follow")
    say(f"  dreambooth report {name} -n {ns} -o {name}-report.html")


@app.command("list")
def list_(
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="List jobs in every namespace.")
    ] = False,
    namespace: Namespace = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """List DreamBoothJobs with phase, progress, loss, restarts and age."""
    client = DreamBoothClient(kubeconfig, context, namespace)
    jobs = client.list(all_namespaces)
    if not jobs:
        where = "any namespace" if all_namespaces else f"namespace {client.namespace}"
        err_console.print(f"no {api.JOB_PLURAL} in {where}", markup=False)
        return
    table = Table(
        "NAME", "NAMESPACE", "PHASE", "PROGRESS", "LOSS", "RESTARTS", "GPU-MIN", "AGE", box=None, pad_edge=False
    )
    now = datetime.now(UTC)
    for job in jobs:
        table.add_row(*(Text(cell) for cell in present.job_row(job.raw, now)))
    out.print(table)


@app.command()
def status(name: JobName, namespace: Namespace = None, context: Context = None, kubeconfig: Kubeconfig = None) -> None:
    """Show a job's phase, progress, outputs and conditions (exit 4 when the job failed, 7 when it failed its
    quality gate)."""
    client = DreamBoothClient(kubeconfig, context, namespace)
    job = client.get(name)
    details = Table(show_header=False, box=None, pad_edge=False)
    for key, value in present.detail_rows(job.raw):
        details.add_row(Text(key, style="bold"), Text(value))
    out.print(Text(f"{api.JOB_KIND} {client.namespace}/{name}", style="bold"))
    out.print(details)
    rows = present.condition_rows(job.raw)
    if rows:
        table = Table("TYPE", "STATUS", "REASON", "MESSAGE", "LAST TRANSITION", title="Conditions")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        out.print(table)
    if job.failed:  # scripts can test `dreambooth status NAME` like `watch`: exit 4 for a failed job
        raise CliError(f"{name} failed: {job.failure_message}", ExitStatus.JOB_FAILED)
    if job.quality_gate_failed is not None:  # exit 7: succeeded, but under evaluation.minScore
        raise CliError(f"{name} failed its quality gate: {job.quality_gate_failed}", ExitStatus.QUALITY_GATE_FAILED)


@app.command()
def watch(
    name: JobName,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between status reads.")] = 2.0,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Give up after this many seconds.")] = None,
    namespace: Namespace = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Show a live progress bar from the job's status until it succeeds (exit 0) or fails (non-zero; 7 when it
    succeeded under evaluation.minScore: QualityGateFailed)."""
    client = DreamBoothClient(kubeconfig, context, namespace).connect()  # fail before the display starts
    last: JobInfo | None = None
    with ProgressDisplay(err_console, description=name) as display:

        def retrying(err: ApiError, delay: float) -> None:
            display.note(f"{name}: {err.message}; retrying in {delay:g}s")

        for job in client.watch(name, timeout=timeout, interval=interval, on_retry=retrying):
            if last is None or job.progress.phase != last.progress.phase:  # Running, then Evaluating, ...
                display.note(f"{name}: {job.progress.phase}")
            display.update(job.progress)
            last = job
    assert last is not None  # watch yields at least one read, or raises
    if last.failed:
        raise CliError(f"{name} failed: {last.failure_message}", ExitStatus.JOB_FAILED)
    say(f"{name} succeeded; model: {last.model_uri or '-'}")
    if last.quality_gate_failed is not None:  # the model is exported, but under evaluation.minScore
        raise CliError(f"{name} failed its quality gate: {last.quality_gate_failed}", ExitStatus.QUALITY_GATE_FAILED)


@app.command()
def logs(
    name: JobName,
    rank: Annotated[int, typer.Option("--rank", help="The node rank (completion index) whose pod to read.")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines until the pod ends.")] = False,
    raw_json: Annotated[bool, typer.Option("--json", help="Print the trainer's JSON lines as they are.")] = False,
    namespace: Namespace = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Print the trainer log of one rank's pod (the newest attempt), one readable line per event."""
    for line in DreamBoothClient(kubeconfig, context, namespace).logs(name, rank=rank, follow=follow):
        event = None if raw_json else parse_line(line)
        sys.stdout.write(line if event is None else format_log_event(event) + "\n")
        sys.stdout.flush()


@app.command()
def report(
    source: Annotated[str, typer.Argument(help="A job name, or a local run folder (workdir or output).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write.")] = None,
    namespace: Namespace = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Write a self-contained HTML report: config, loss and LR plots, samples per step, checkpoints, timings."""
    folder = Path(source)
    if folder.is_dir():
        run_dir = localrun.output_dir_of(folder)
        if not looks_like_run(run_dir):
            raise InputError(f"{folder}: no run outputs here (metrics.jsonl, config.json, result.json or samples/)")
        path = write_report(load_run(run_dir), output or folder / "report.html")
    else:
        path = DreamBoothClient(kubeconfig, context, namespace).report(source, output)
    say(f"report: {path}")


@app.command()
def evaluate(
    source: Annotated[
        str,
        typer.Argument(
            help="A job's name, or a local run folder (workdir or output) of a finished run.", show_default=False
        ),
    ],
    timeout: Annotated[float | None, typer.Option("--timeout", help="Give up waiting after this many seconds.")] = None,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between status reads.")] = 2.0,
    namespace: Namespace = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Evaluate a finished job's exported model again (spec.evaluation and spec.vlm) and print the scores and the
    gate: a job in the cluster (NAME: the operator runs the Job NAME-eval), or a local run (DIR: an existing folder;
    the files go next to the model). Exit 7 when the quality gate failed, 4 when the evaluation failed, 2 when the
    job cannot be evaluated (not succeeded, no spec.evaluation)."""
    if evaluation.is_local_run(source):
        _evaluate_local(Path(source))
        return
    client = DreamBoothClient(kubeconfig, context, namespace).connect()
    done = client.evaluate(
        source,
        timeout=timeout,
        interval=interval,
        on_progress=lambda line: err_console.print(f"{source}: {line}", markup=False),
    )
    result, last = done.outcome, done.job
    if result.reason == api.Reason.REEVALUATION_NOT_POSSIBLE:
        raise InputError(f"{source}: {result.message}")
    if not result.ok:
        raise CliError(f"{source}: {result.message}", ExitStatus.JOB_FAILED)
    for key, value in evaluation.score_rows(last.raw):
        say(f"{key}: {value}")
    if last.quality_gate_failed is not None:
        raise CliError(f"{source} failed its quality gate: {last.quality_gate_failed}", ExitStatus.QUALITY_GATE_FAILED)


def _evaluate_local(folder: Path) -> None:
    """`evaluate DIR`: the trainer's evaluation.rerun on a local run's output folder."""
    fields = localrun.evaluate_run(localrun.output_dir_of(folder))
    for name, value in sorted((fields.get("evaluation") or {}).items()):
        say(f"{name}: {value:.4g}")
    gate = fields.get("qualityGate")
    reason = fields.get("qualityGateReason")
    say(f"quality gate: {gate}" + (f" ({reason})" if reason else ""))
    say(f"detail: {fields.get('evaluationUri')}")
    if gate == "failed":
        raise CliError(f"{folder} failed its quality gate: {reason}", ExitStatus.QUALITY_GATE_FAILED)


@app.command()
def generate(
    name: Annotated[str, typer.Argument(help="The InferenceService's name.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to draw.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The folder to write the PNGs into.")] = Path(),
    subject: Annotated[
        str | None, typer.Option("--subject", help="A subject to draw (a LoRA job's name); the base model if unset.")
    ] = None,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many images.")] = 1,
    size: Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT (default: the model's own).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Image i uses seed + i (default: random).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampling steps (default: the server's).")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What not to draw.")] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="The server's base URL (a port-forward's, or status.url in the cluster) instead of "
            "the API server's service proxy.",
        ),
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="The bearer token (default: read from the service's auth Secret).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after this many seconds.")] = 600.0,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Namespace (default: the context's).")] = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
) -> None:
    """Generate images with an InferenceService (OpenAI Images API) and write them as PNGs."""
    client = DreamBoothClient(kubeconfig, context, namespace)
    what = f"{count} image{'s' if count > 1 else ''} of {subject or 'the base model'}"
    started = time.monotonic()
    err_console.print(f"{name}: generating {what}{f' at {size}' if size else ''} ...", markup=False)
    with err_console.status(f"{name}: generating {what}", spinner="dots") as status:

        def waiting(note: str) -> None:
            err_console.print(note, markup=False)
            status.update(note)

        images = client.generate(
            name,
            prompt,
            output,
            subject=subject,
            n=count,
            size=size,
            seed=seed,
            steps=steps,
            negative_prompt=negative_prompt,
            url=url,
            token=token,
            timeout=timeout,
            on_wait=waiting,
        )
    err_console.print(f"{name}: {len(images)} image(s) in {time.monotonic() - started:.1f}s", markup=False)
    for image in images:
        say(f"{image.path}" + (f"  (seed {image.seed})" if image.seed is not None else ""))


@app.command("demo-subject")
def demo_subject(
    folder: Annotated[Path, typer.Argument(help="Where to write the PNGs.")],
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 64,
    count: Annotated[int, typer.Option(help="How many poses (at most 6).")] = 6,
) -> None:
    """Draw the demo's synthetic subject (a coloured geometric toy at a few poses): photos to try a job with."""
    paths = subject.write_subject(folder, size=size, count=count)
    say(f"wrote {len(paths)} images to {folder}")


def _prog_name() -> str:
    name = Path(sys.argv[0]).name
    return "kubectl dreambooth" if name.startswith("kubectl-") else "dreambooth"


def usage_message(err: click.ClickException) -> str:
    """One line for a bad command line: click's message and where to find the usage."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        return f"{message} (see: {ctx.command_path} --help)"
    return message


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and exit statuses; `--debug` anywhere adds tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name=_prog_name(), standalone_mode=False)
    except CliError as err:
        if debug:
            traceback.print_exc()
        err_console.print(f"error: {err.message}", markup=False, soft_wrap=True)
        sys.exit(int(err.status))
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.exceptions.NoArgsIsHelpError as err:
        err.show()  # the help text, as for --help
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err_console.print(f"error: {usage_message(err)}", markup=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        err_console.print(
            f"error: {type(err).__name__}: {err} (run with --debug for a traceback)", markup=False, soft_wrap=True
        )
        sys.exit(int(ExitStatus.ERROR))
