"""Running an ablation plan: train and evaluate every setting × seed, skipping what is done.

Each run trains in ``outdir/runs/<train-slug>/seed<k>`` and evaluates into its
``eval`` folder (``eval-<slug>`` for settings with ``eval.`` keys, which share
the checkpoint). A rerun of the same command:

* skips a run whose training is complete (latest checkpoint at ``total_steps``)
  AND whose ``results.json`` was written with the same evaluation config;
* resumes an unfinished training from its latest checkpoint (the training
  loop does that by itself) and evaluates it;
* re-evaluates (training untouched) when the evaluation config changed;
* refuses to touch a workdir trained with a different training config.

Runs are executed **in-process** (``train_and_evaluate`` and ``run_evaluation``
called directly) rather than as one subprocess per run, because:

* JAX, TensorFlow and the data set are loaded once, not once per run (~10 s
  each on a small CPU, a large share of a demo-size run), and JAX's caches of
  op-by-op compilations (parameter init, data preprocessing) are reused by
  every run of the same model shape;
* errors stay typed: a ``UserInputError`` stops the sweep with its message, a
  ``DivergenceError`` marks that one run as diverged (``DIVERGED.txt``) and the
  sweep goes on (divergence is a result of an ablation, not a crash);
* tests can inject a hook between runs to interrupt a sweep deterministically.

The cost is isolation: a crash that kills the interpreter (out of memory)
stops the whole sweep, but rerunning the command resumes it exactly where it
stopped, which is the point of the skip/resume rules above. A SIGTERM during
training saves a checkpoint (the loop's own handling) and stops the sweep
cleanly; rerun to continue.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable

from ssl_ad.ablation import aggregate
from ssl_ad.ablation.grid import (
    DIVERGED,
    RESUMABLE_KEYS,
    Plan,
    Run,
    config_differences,
    format_seconds,
    make_plan,
    normalised,
)
from ssl_ad.atomic import atomic_write_text
from ssl_ad.errors import DivergenceError, UserInputError
from ssl_ad.checkpointing import COMMIT_FILE
from ssl_ad.evaluation.runner import run_evaluation
from ssl_ad.train.loop import train_and_evaluate

log = logging.getLogger(__name__)

# Evaluation keys that name locations, not what is measured.
EVAL_LOCATION_KEYS = ("checkpoint", "data.data_dir", "data.download")

Hook = Callable[[str, Run], None]


class SweepStopped(Exception):
    """Training of a run stopped before total_steps (SIGTERM): the sweep stops, rerun to resume."""


def latest_step(workdir: str) -> int | None:
    """The latest complete checkpoint step in ``workdir`` (None if there is none).

    Read from the folder names, counting a step only once orbax wrote its commit marker
    (what ``Checkpointer.latest_step`` reports too, without opening a manager per run).
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit() and os.path.exists(os.path.join(ckpt_dir, n, COMMIT_FILE))]
    return max(steps) if steps else None


def training_complete(run: Run) -> bool:
    step = latest_step(run.workdir)
    return step is not None and step >= int(run.train_config.total_steps)


def evaluation_complete(run: Run) -> bool:
    """results.json exists and was written with this run's evaluation config."""
    stored = _stored_eval_config(run)
    return stored is not None and not config_differences(stored, normalised(run.eval_config), EVAL_LOCATION_KEYS)


def _stored_eval_config(run: Run) -> dict | None:
    path = os.path.join(run.evaldir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["meta"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: evaluate again


def run_status(run: Run) -> str:
    """'done', 'diverged', 'evaluate' (trained, not evaluated), 'resume from step N' or 'train'."""
    if os.path.exists(os.path.join(run.workdir, DIVERGED)):
        return "diverged"
    step = latest_step(run.workdir)
    if step is not None and step >= int(run.train_config.total_steps):
        return "done" if evaluation_complete(run) else "evaluate"
    return f"resume from step {step}" if step is not None else "train"


def check_existing_workdirs(plan: Plan) -> None:
    """A workdir already trained with another training config is an error (nothing is changed)."""
    for run in plan.runs:
        path = os.path.join(run.workdir, "config.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            stored = json.load(f)
        diff = config_differences(stored, normalised(run.train_config), RESUMABLE_KEYS)
        if diff:
            raise UserInputError(
                f"{run.workdir} was trained with a different training config (differs in: {', '.join(diff)}); "
                "use another --outdir, or delete that run to retrain it"
            )


def _describe_plan(plan: Plan, statuses: list[str]) -> str:
    lines = [f"Ablation '{plan.name}': {len(plan.settings)} setting(s) × {len(plan.seeds)} seed(s) = {len(plan.runs)} runs"]
    for run, status in zip(plan.runs, statuses):
        lines.append(f"  [run {run.number}/{len(plan.runs)}] {run.title:<40s} {status:<22s} {run.evaldir}")
    return "\n".join(lines)


def _write_plan(plan: Plan, ablation: Any, command: str) -> None:
    info = {
        "name": plan.name,
        "command": command,
        "ablation_config": ablation.to_dict() if hasattr(ablation, "to_dict") else dict(ablation),
        "train_config": plan.train_config_path,
        "eval_config": plan.eval_config_path,
        "seeds": plan.seeds,
        "settings": [
            {"label": s.label, "slug": s.slug, "overrides": s.overrides, "train_slug": s.train_slug, "eval_slug": s.eval_slug}
            for s in plan.settings
        ],
        "runs": [{"run": r.number, "setting": r.setting.label, "seed": r.seed, "workdir": r.workdir, "evaldir": r.evaldir}
                 for r in plan.runs],
    }
    atomic_write_text(os.path.join(plan.outdir, "ablation.json"), json.dumps(info, indent=2, default=repr) + "\n")


def _train(run: Run) -> None:
    train_and_evaluate(run.train_config, run.workdir)
    step = latest_step(run.workdir)
    if step is None or step < int(run.train_config.total_steps):
        raise SweepStopped(
            f"training of run {run.number} ({run.title}) stopped at step {step} of {run.train_config.total_steps}; "
            "rerun the same command to resume"
        )


def _evaluate(run: Run, command: str) -> None:
    if _stored_eval_config(run) is not None:  # evaluated before with another config: start clean
        log.info("Evaluation config of %s changed since its results.json; evaluating again", run.evaldir)
        shutil.rmtree(os.path.join(run.evaldir, "features"), ignore_errors=True)
    run_evaluation(run.eval_config, run.evaldir, command=command)


def run_ablation(
    ablation: Any, outdir: str, command: str = "", hook: Hook | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Plans, validates, runs (or skips/resumes) every run, then writes ablation.csv/.md and plots.

    ``hook(event, run)`` is called with ``"trained"`` after a run's training
    finished in this call and ``"done"`` after each run (done or skipped).
    Returns a summary: ``plan``, ``statuses`` (per run), ``stopped`` (a
    message, or None) and ``outputs`` (written paths).
    """
    plan = make_plan(ablation, outdir)  # every key checked: raises before anything is written
    check_existing_workdirs(plan)
    statuses = [run_status(r) for r in plan.runs]
    log.info("%s", _describe_plan(plan, statuses))
    if dry_run:
        return {"plan": plan, "statuses": statuses, "stopped": None, "outputs": {}}

    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create outdir {outdir}: {e.strerror}") from e
    _write_plan(plan, ablation, command)

    t_start = time.perf_counter()
    worked: list[float] = []  # durations of runs that trained or evaluated (for the ETA)
    stopped = None
    total = len(plan.runs)
    for i, run in enumerate(plan.runs):
        head = f"[run {run.number}/{total}] {run.title}"
        status = run_status(run)
        if status in ("done", "diverged"):
            log.info("%s — %s, skipped — elapsed %s", head, status, format_seconds(time.perf_counter() - t_start))
            statuses[i] = status
            if hook:
                hook("done", run)
            continue
        log.info("%s — %s — elapsed %s", head, status, format_seconds(time.perf_counter() - t_start))
        t0 = time.perf_counter()
        train_s = 0.0
        try:
            if status != "evaluate":
                _train(run)
                train_s = time.perf_counter() - t0
                if hook:
                    hook("trained", run)
            _evaluate(run, command)
            statuses[i] = "done"
        except DivergenceError as e:
            atomic_write_text(os.path.join(run.workdir, DIVERGED), f"{e}\n")
            log.warning("%s diverged: %s (marked %s; delete it to retry)", head, e, DIVERGED)
            statuses[i] = "diverged"
        except SweepStopped as e:
            stopped = str(e)
            statuses[i] = "stopped"
            log.warning("%s", e)
            break
        took = time.perf_counter() - t0
        worked.append(took)
        remaining = sum(1 for r in plan.runs[i + 1:] if run_status(r) not in ("done", "diverged"))
        eta = f", ETA ~{format_seconds(remaining * sum(worked) / len(worked))}" if remaining else ""
        log.info("%s — %s in %s (train %s, eval %s) — elapsed %s%s", head, statuses[i], format_seconds(took),
                 format_seconds(train_s), format_seconds(took - train_s), format_seconds(time.perf_counter() - t_start), eta)
        if hook:
            hook("done", run)

    outputs = aggregate.write_outputs(plan, command=command)
    log.info("Ablation '%s': %d/%d runs done in %s; wrote %s", plan.name, statuses.count("done"), total,
             format_seconds(time.perf_counter() - t_start), ", ".join(str(p) for p in outputs.values() if p))
    return {"plan": plan, "statuses": statuses, "stopped": stopped, "outputs": outputs}
