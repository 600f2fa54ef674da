"""`ttsctl run`: stage runs in order, each waiting for the previous one, with progress lines."""

from __future__ import annotations

import time
from collections.abc import Callable

from controller.backends.base import Backend, Phase
from controller.plan import StageRun, build_plan, layout_of
from controller.spec import PipelineSpec
from trainer import io
from trainer.stages import STEPS


def already_done(run: StageRun) -> bool:
    """A previously trained codec counts when its directory was published completely."""
    url = run.skip_if_complete
    return bool(url) and (io.is_complete(url) or io.exists(io.join(url, "model_config.json")))


def run_pipeline(spec: PipelineSpec, backend: Backend, names: list[str],
                 say: Callable[[str], None] = print) -> int:
    """Run `names` in order; 0 when all succeed, 1 at the first failure (the rest are not started)."""
    plan = build_plan(spec, names)
    say(f"run {spec.name!r} on {backend.name}: {' -> '.join(r.name for r in plan)}")
    t0 = time.time()
    for run in plan:
        if already_done(run):
            say(f"== {run.name}: skipped, found {run.skip_if_complete}")
            continue
        submitted = backend.submit(spec, run)
        say(f"==> {run.name}: started ({submitted.reason or submitted.phase.value})")
        status = backend.wait(spec.name, run.name, notify=lambda msg, stage=run.name: say(f"... {stage}: {msg}"))
        took = f"{status.duration_s:.1f}s" if status.duration_s is not None else "?"
        if status.phase is not Phase.SUCCEEDED:
            say(f"xx {run.name}: {status.phase.value} after {took}: {status.reason}"
                + (f": {status.message}" if status.message else ""))
            say(backend.failure_hint(spec.name, run.name))
            rest = [r.name for r in plan[plan.index(run) + 1 :]]
            if rest:
                say(f"not started: {', '.join(rest)}; after fixing, resume with --from {run.name}")
            return 1
        say(f"<== {run.name}: succeeded in {took}")
    say(f"run {spec.name!r} succeeded in {time.time() - t0:.1f}s")
    for line in output_summary(spec, [r.name for r in plan]):
        say(line)
    return 0


def output_summary(spec: PipelineSpec, names: list[str]) -> list[str]:
    """Where to look after a run: the final models, the synthesised audio and the report."""
    layout = layout_of(spec)
    lines = [f"outputs of run {spec.name!r}:"]
    for name in names:
        source = STEPS[name].source
        if source:
            lines.append(f"  {source + ' model (serving dir):':<29} {layout.output(name)}")
    if "eval" in names:
        report = layout.output("eval")
        lines.append(f"  {'synthesised audio (WAV):':<29} {io.join(report, 'audio')}/")
        lines.append(f"  {'evaluation report:':<29} {io.join(report, 'report.html')}")
        lines.append(f"  {'scores (per item + summary):':<29} {io.join(report, 'results.json')}")
    return lines
