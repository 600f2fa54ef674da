"""`ttsctl`: validate, render and run a pipeline spec, locally or on Kubernetes (Kubeflow PyTorchJob).

Exit codes: 0 ok; 1 a stage or the cluster failed (the message says what to do); 2 bad spec, config
or arguments; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from controller import render as renderer
from controller.backends import BACKENDS, Backend, BackendError, Phase, get_backend
from controller.pipeline import run_pipeline
from controller.plan import build_plan, select_stages
from controller.spec import load_spec
from trainer.errors import ConfigError
from trainer.stages import STEP_ORDER

SUBMIT_START_TIMEOUT_S = 60.0


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    plan = build_plan(spec)
    objects = renderer.render_dicts(spec)
    print(f"{args.spec}: ok: run {spec.name!r}, stages {', '.join(r.name for r in plan)}; "
          f"{len(objects)} Kubernetes objects")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    names = select_stages(spec, _stage_list(args.stages)) if args.stages else None
    objects = renderer.render_dicts(spec, names)
    if args.output:
        for path in renderer.write_dir(objects, args.output):
            print(path)
    else:
        sys.stdout.write(renderer.to_yaml(objects))
    return 0


def _stage_list(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _backend(args: argparse.Namespace, namespace: str | None = None) -> Backend:
    return get_backend(args.backend, args.namespace or namespace, echo=not getattr(args, "quiet", False))


def _run_ref(args: argparse.Namespace) -> tuple[str, Backend]:
    """RUN is a run name or its spec file; the namespace: --namespace/$TTSCTL_NAMESPACE, else the spec's,
    else the kubeconfig context's (as kubectl), else `default`."""
    if args.run.endswith((".yaml", ".yml")) or os.path.isfile(args.run):
        spec = load_spec(args.run)
        return spec.name, _backend(args, spec.cluster.namespace)
    return args.run, _backend(args)


def cmd_run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    names = select_stages(spec, _stage_list(args.stages), args.start)
    backend = _backend(args, spec.cluster.namespace)
    return run_pipeline(spec, backend, names, say=lambda line: print(line, flush=True))


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    (name,) = select_stages(spec, [args.stage])
    backend = _backend(args, spec.cluster.namespace)
    if backend.name == "local":
        return _submit_local(args, spec.name, name, backend)
    (run,) = build_plan(spec, [name])
    print(backend.submit(spec, run).describe())
    return 0


def _submit_local(args: argparse.Namespace, run_name: str, stage: str, backend: Backend) -> int:
    """Local stages need a parent to record their exit status: start a detached `ttsctl run`."""
    try:
        current = backend.status(run_name, stage)
    except BackendError:
        current = None
    if current is not None and current.phase is Phase.RUNNING:
        print(f"{current.describe()} (already running: attached)")
        return 0
    driver_log = backend.run_dir(run_name) / "logs" / f"ttsctl-{stage}.out"
    driver_log.parent.mkdir(parents=True, exist_ok=True)
    with open(driver_log, "a") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "run", args.spec, "--stages", stage, "--backend", "local",
             "--quiet"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + SUBMIT_START_TIMEOUT_S
    while time.time() < deadline:
        try:
            status = backend.status(run_name, stage)
            if status.phase is not Phase.PENDING and (current is None or status.started != current.started):
                print(f"{status.describe()}; follow with: ttsctl logs {run_name} --stage {stage} --follow")
                return 0
        except BackendError:
            pass
        if driver.poll() is not None:
            raise BackendError(f"stage {stage} did not start; see {driver_log}")
        time.sleep(0.2)
    raise BackendError(f"stage {stage} did not start within {SUBMIT_START_TIMEOUT_S:.0f}s; see {driver_log}")


def cmd_status(args: argparse.Namespace) -> int:
    run, backend = _run_ref(args)
    summary = backend.run_status(run)
    print(f"run {summary.run} ({summary.backend}): {summary.phase.value}")
    for stage in summary.stages:
        took = f" [{stage.duration_s:.0f}s]" if stage.duration_s is not None else ""
        print(f"  {stage.describe()}{took}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    run, backend = _run_ref(args)
    stage = args.stage
    if stage is None:
        stages = backend.run_status(run).stages
        if not stages:
            raise BackendError(f"run {run!r} has no stages yet")
        stage = stages[-1].stage
    for line in backend.logs(run, stage, follow=args.follow, workers=args.workers):
        sys.stdout.write(line)
        sys.stdout.flush()
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    run, backend = _run_ref(args)
    summary = backend.run_status(run)
    while True:
        active = [s for s in summary.stages if not s.phase.done]
        if not active:
            # A local pipeline starts its next stage right after one ends: look once more.
            time.sleep(1.0)
            try:
                summary = backend.run_status(run)
            except BackendError:
                break  # every job already removed (ttlSecondsAfterFinished): the last look stands
            if all(s.phase.done for s in summary.stages):
                break
            continue
        ended = backend.wait(run, active[0].stage, notify=lambda msg: print(f"... {msg}", flush=True))
        # The job may be gone by now (cancelled, TTL): keep what wait saw rather than look it up again.
        summary.stages = [ended if s.stage == ended.stage else s for s in summary.stages]
        if ended.phase is not Phase.SUCCEEDED:
            break
    print(f"run {summary.run}: {summary.phase.value}")
    for stage in summary.stages:
        print(f"  {stage.describe()}")
    return 0 if summary.phase is Phase.SUCCEEDED else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    run, backend = _run_ref(args)
    done = backend.cancel(run)
    print(f"cancelled {run}: {', '.join(done) if done else 'nothing (no stage was running)'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    runs = _backend(args).list_runs()
    if not runs:
        print(f"no runs ({args.backend})")
    for summary in runs:
        last = summary.stages[-1].describe() if summary.stages else "-"
        print(f"{summary.run}\t{summary.phase.value}\t{last}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttsctl",
        description="Run a SpeechLM TTS training pipeline spec on this machine (local) or on Kubernetes "
                    f"(kubeflow). Stages, in order: {', '.join(STEP_ORDER)}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check a spec and every stage config it references")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print every Kubernetes object of the pipeline (YAML)")
    p.add_argument("spec")
    p.add_argument("-o", "--output", metavar="DIR", help="write one file per object into DIR")
    p.add_argument("--stages", metavar="A,B", help="only these stages")
    p.set_defaults(func=cmd_render)

    backend_opts = argparse.ArgumentParser(add_help=False)
    backend_opts.add_argument("--backend", choices=BACKENDS, default=os.environ.get("TTSCTL_BACKEND", "local"),
                              help="where stages run (default: $TTSCTL_BACKEND or local)")
    backend_opts.add_argument("-n", "--namespace", default=os.environ.get("TTSCTL_NAMESPACE"),
                              help="Kubernetes namespace (kubeflow; default: $TTSCTL_NAMESPACE, else the spec's "
                                   "cluster.namespace, else the kubeconfig context's)")

    p = sub.add_parser("run", parents=[backend_opts], help="run the stages in order, each after the previous")
    p.add_argument("spec")
    p.add_argument("--stages", metavar="A,B", help="only these stages (still in run order)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    p.add_argument("--quiet", action="store_true", help="do not echo stage output (it still goes to the logs)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", parents=[backend_opts], help="start one stage and return (attaches if running)")
    p.add_argument("spec")
    p.add_argument("stage", choices=STEP_ORDER)
    p.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "show the stages of a run"),
                             ("wait", cmd_wait, "block until the run ends (exit 1 if a stage failed)"),
                             ("cancel", cmd_cancel, "stop every running stage of a run")):
        p = sub.add_parser(name, parents=[backend_opts], help=text)
        p.add_argument("run", help="run name, or its spec file (which also gives the namespace)")
        p.set_defaults(func=func)

    p = sub.add_parser("logs", parents=[backend_opts], help="print a stage's log (default: the latest stage)")
    p.add_argument("run", help="run name, or its spec file (which also gives the namespace)")
    p.add_argument("--stage", choices=STEP_ORDER)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the stage ends")
    p.add_argument("--workers", action="store_true", help="every pod, not only the master (kubeflow)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("list", parents=[backend_opts], help="list runs")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BackendError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ttsctl logs ... | head`): stop quietly, as a SIGPIPE'd tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
