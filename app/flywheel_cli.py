"""`rewardranker flywheel run`, `train`, `status` and `worker`."""

import json
import os
import time
from dataclasses import fields
from datetime import datetime, timedelta
from importlib.util import find_spec
from typing import Annotated, Any

import sqlalchemy.exc
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import migrate
from app.console import console, err_console
from app.queries import held_out_table, interval_text
from models import (
    Evaluation,
    Iteration,
    Problem,
    TrainingRun,
)
from models.base import utcnow
from models.db import session_scope
from models.enums import EvaluationStatus, IterationStatus, ModelKind, RunKind, RunStatus
from models.repository import current_model, iteration_summaries, problem_progress
from models.settings import get_settings
from pipelines.evaluation import change_text
from workers.iteration import FlywheelParams, blocked_reason, iteration_to_follow
from workers.names import QUEUES
from workers.reconcile import reconcile

flywheel_app = typer.Typer(help="The flywheel's main job.", no_args_is_help=True)
train_app = typer.Typer(help="Enqueue a training onto the `training` queue.", no_args_is_help=True)


QUEUE_GROUPS = tuple((queue,) for queue in QUEUES)
"""One worker process per queue."""


# --- worker ------------------------------------------------------------------------


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = ",".join(
        QUEUES
    ),
    concurrency: Annotated[int, typer.Option(min=1, help="Pool processes.")] = 1,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads.")] = "prefork",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker on QUEUES (what the compose file and the main job start).
    A worker that does not train also takes the scheduled reconcile (`rewardranker
    beat`); a training worker would hold one unrun for as long as it trains."""
    from workers.celery_app import celery
    from workers.names import MAINTENANCE, TRAINING

    consumed = queues.split(",")
    if TRAINING not in consumed:
        consumed.append(MAINTENANCE)

    # The store, not worker gossip, holds the state: no gossip or mingle. On a
    # real broker the workers send heartbeats and task events, which Flower and
    # `celery events` show; nothing watches the embedded broker's workers.
    embedded = get_settings().celery_broker_url.startswith("filesystem")
    events = ["--without-heartbeat"] if embedded else ["--task-events"]
    celery.worker_main(
        [
            "worker",
            "--queues", ",".join(consumed),
            "--concurrency", str(concurrency),
            "--pool", pool,
            "--loglevel", loglevel,
            "--hostname", f"{queues.replace(',', '+')}-%i@%h",
            "--without-gossip", "--without-mingle", *events,
        ]
    )  # fmt: skip


def beat(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Send the scheduled reconcile every RR_RECONCILE_INTERVAL (Celery beat): lost
    trainings are reclaimed and stalled stages re-sent even while no driver runs.
    Run one per deployment; a second one only sends redundant, harmless copies."""
    from workers.celery_app import celery

    schedule = get_settings().data_dir / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    celery.start(["beat", "--loglevel", loglevel, "--schedule", str(schedule)])


# --- train ------------------------------------------------------------------------------


def _enqueue_and_follow(kind: RunKind, wait: bool) -> None:
    from workers.runs import enqueue_training, follow_run

    migrate.upgrade()
    with session_scope() as session:
        iteration_id = session.scalar(select(func.max(Iteration.id)))
        if kind == RunKind.POLICY and iteration_id is None:
            err_console.print(
                "error: a policy update needs an iteration (run `flywheel run` first)"
            )
            raise typer.Exit(2)
        run, created = enqueue_training(session, kind, iteration_id=iteration_id)
        run_id = run.id
    console.print(
        f"training run {run_id} ({kind.value}) {'queued' if created else 'already active'}"
    )
    if not wait:
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task(f"{kind.value} run {run_id}", total=1.0)

        def show(row: TrainingRun) -> None:
            bar.update(
                task,
                completed=row.progress,
                description=f"{kind.value} run {run_id}: {row.status.value}"
                + (f", resumed at step {row.resumed_from_step}" if row.resumed_from_step else ""),
            )

        final = follow_run(run_id, show)
    if final.status != RunStatus.SUCCEEDED:
        err_console.print(f"run {run_id} {final.status.value}: {final.error or ''}")
        raise typer.Exit(1)
    console.print(f"run {run_id} succeeded: model version {final.result_model_version_id}")


@train_app.command("reward")
def train_reward(
    wait: Annotated[bool, typer.Option("--wait", help="Follow it to the end.")] = False,
) -> None:
    """Enqueue a reward-model retraining and print its run id."""
    _enqueue_and_follow(RunKind.REWARD, wait)


@train_app.command("policy")
def train_policy(
    wait: Annotated[bool, typer.Option("--wait", help="Follow it to the end.")] = False,
) -> None:
    """Enqueue a policy update of the current generator and print its run id."""
    _enqueue_and_follow(RunKind.POLICY, wait)


# --- evaluate -----------------------------------------------------------------------------


def evaluate(
    iteration: Annotated[
        int, typer.Option("--iteration", min=0, help="0: the baseline; N: after iteration N.")
    ],
) -> None:
    """Evaluate iteration N's models on the held-out problems, in this process.

    A finished evaluation has its metrics recomputed from its stored samples; an
    unfinished or missing one is completed (sampling, executing, scoring: what the
    queues' tasks do); then the held-out table is printed. Running it twice changes
    nothing.
    """
    from workers.evaluation import batches, evaluation_metrics, finish_evaluation
    from workers.execution import execute_drawn_programs
    from workers.generation import draw_evaluation_samples
    from workers.iteration import advance_iteration, start_evaluation
    from workers.labeling import score_drawn_programs

    migrate.upgrade()
    with session_scope() as session:
        evaluation = session.scalar(select(Evaluation).where(Evaluation.number == iteration))
        if evaluation is None:
            owner = session.scalar(select(Iteration).where(Iteration.number == max(iteration, 1)))
            if owner is None:
                err_console.print(f"error: no iteration {max(iteration, 1)} in the store")
                raise typer.Exit(1)
            evaluation = start_evaluation(session, iteration, owner, enqueue=False)
            if evaluation is None:
                err_console.print(
                    f"error: nothing to evaluate for iteration {iteration}: its reward model "
                    "is not trained yet, or no held-out problem has tests "
                    "(see `rewardranker problems split`)"
                )
                raise typer.Exit(1)
        evaluation_id, problem_ids = evaluation.id, evaluation.params["problem_ids"]
        finished = evaluation.status == EvaluationStatus.DONE
    if finished:
        with session_scope() as session:
            evaluation = session.get(Evaluation, evaluation_id)
            evaluation.metrics = evaluation_metrics(session, evaluation)
    else:  # each step its own transaction, as a task's would be
        for batch in batches(evaluation, problem_ids):
            with session_scope() as session:
                draw_evaluation_samples(session, evaluation_id, batch)
        for problem_id in problem_ids:
            with session_scope() as session:
                execute_drawn_programs(session, evaluation_id, problem_id)
            with session_scope() as session:
                score_drawn_programs(session, evaluation_id, problem_id)
        with session_scope() as session:
            if not finish_evaluation(session, evaluation_id):
                err_console.print(f"error: evaluation {iteration} is still incomplete")
                raise typer.Exit(1)
        with session_scope() as session:  # an iteration waiting on it may now be done
            advance_iteration(session, session.get(Evaluation, evaluation_id).iteration_id)
    with session_scope() as session:
        table = held_out_table(session)
    print_held_out(table)


# --- status -------------------------------------------------------------------------------


def status_report() -> dict[str, Any]:
    """Queues, iterations, counts and current models as one JSON-ready object."""
    from workers.celery_app import celery

    with session_scope() as session:
        current = {kind: current_model(session, kind) for kind in ModelKind}
        models = {kind.value: version and version.id for kind, version in current.items()}
        runs = [
            {"id": r.id, "kind": r.kind.value, "status": r.status.value, "progress": r.progress,
             "iteration_id": r.iteration_id, "error": r.error, "attempt": r.attempt,
             "resumed_from_step": r.resumed_from_step}
            for r in session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(10))
        ]  # fmt: skip
        iterations = iteration_rows(session)
        held_out = held_out_table(session)
        problems = session.scalar(select(func.count()).select_from(Problem))
    queues: dict[str, int | None] = {}
    try:
        with celery.connection_for_read() as connection:
            channel = connection.default_channel
            for name in QUEUES:
                queues[name] = channel.queue_declare(queue=name, passive=True).message_count
    except Exception as error:  # the broker may be down; status still reports the store
        queues = {name: None for name in QUEUES} | {"error": str(error)}
    return {
        "problems": problems,
        "queues": queues,
        "models": models,
        "runs": runs,
        "iterations": iterations,
        "held_out": held_out,
    }


def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Queues, iterations, counts and the current model versions."""
    migrate.upgrade()
    report = status_report()
    if as_json:
        print(json.dumps(report, default=str))
        return
    console.print(f"problems: {report['problems']}  models: {report['models']}")
    console.print("queues: " + ", ".join(f"{k}={v}" for k, v in report["queues"].items()))
    for run in report["runs"][:5]:
        resumed = run["resumed_from_step"]
        console.print(
            f"run {run['id']} {run['kind']} {run['status']} {run['progress']:.0%}"
            + (f" (attempt {run['attempt']})" if run["attempt"] > 1 else "")
            + (f", resumed at step {resumed}" if resumed is not None else "")
        )
    print_report(report["iterations"])
    print_held_out(report["held_out"])


def print_report(rows: list[dict[str, Any]]) -> None:
    """One line per iteration and language: what was collected and how reranking did."""
    table = Table(
        "iter", "status", "cand", "verdicts", "hard neg", "RM acc", "lang",
        "pass@1 random", "reranked", "oracle", "dvc",
        title="flywheel iterations (pass@1 on each iteration's own training problems)",
    )  # fmt: skip
    for row in rows:
        verdicts = " ".join(f"{_abbrev(k)}={v}" for k, v in sorted(row["verdicts"].items()))
        # "16 (+5 repeats)": five samples repeated a program already stored
        stored = str(row["candidates"]) + (
            f" (+{row['repeats']} repeats)" if row["repeats"] else ""
        )
        head = [str(row["number"]), row["status"], stored, verdicts,
                str(row["hard_negatives"]), _fmt(row["reward_accuracy"])]  # fmt: skip
        evaluation = row["evaluation"] or {"-": {}}
        for language, m in evaluation.items():
            passes = [_fmt(m.get(k)) for k in ("random_pass1", "reranked_pass1", "oracle_pass_n")]
            table.add_row(*head, language, *passes, row["dvc_tag"] or "-")
            head = [""] * len(head)
    console.print(table)


TABLE_ROWS = {"generator": "generator alone", "reranked": "reranked best-of-N"}


def print_held_out(table: dict[str, Any]) -> None:
    """The paper's table: pass@1 on held-out problems with 95% bootstrap intervals."""
    if not table["rows"]:
        console.print("held-out evaluation: none finished yet")
        return
    samples = {e["number"]: e["samples"] for e in table["evaluations"]}
    shown = Table(
        "evaluation", "row", *table["columns"],
        title="pass@1 on held-out problems, 95% bootstrap interval over problems",
    )  # fmt: skip
    for row in table["rows"]:
        number = row["evaluation"]
        label = TABLE_ROWS[row["row"]]
        if row["row"] == "reranked":
            label += f" (N={samples.get(number)})"
        cells = [interval_text(row["cells"][column]) for column in table["columns"]]
        shown.add_row("base" if number == 0 else f"after iter {number}", label, *cells)
    console.print(shown)
    for change in table["changes"][:-1]:  # the last one is the verdict's
        console.print(change_text(change), markup=False)
    console.print(table["verdict"], markup=False)


def _abbrev(verdict: str) -> str:
    """WRONG_ANSWER -> WA; OK stays OK."""
    return "".join(word[0] for word in verdict.split("_")) if "_" in verdict else verdict


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- flywheel run --------------------------------------------------------------------------


def _help(name: str) -> str:
    """The help text of a `FlywheelParams` field: its one home."""
    return next(f for f in fields(FlywheelParams) if f.name == name).metadata["help"]


@flywheel_app.command("run")
def flywheel_run(
    backend: Annotated[str, typer.Option(help=_help("backend"))] = FlywheelParams.backend,
    prompt_style: Annotated[
        str, typer.Option(help=_help("prompt_style"))
    ] = FlywheelParams.prompt_style,
    # The default fits this project's 2-core CPU machines (the bundled model samples
    # slowly there); raise the sizes for bigger runs.
    problems: Annotated[int, typer.Option(min=1, help="Problems per iteration.")] = 4,
    candidates: Annotated[
        int, typer.Option(min=1, help=_help("candidates"))
    ] = FlywheelParams.candidates,
    iterations: Annotated[
        int, typer.Option(min=1, help="Stop once this many iterations are done.")
    ] = 2,
    continuous: Annotated[bool, typer.Option(help="Keep going as new problems arrive.")] = False,
    policy_steps: Annotated[
        int, typer.Option(min=0, help=_help("policy_steps"))
    ] = FlywheelParams.policy_steps,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help=_help("max_new_tokens"))
    ] = FlywheelParams.max_new_tokens,
    eval_problems: Annotated[
        int, typer.Option(min=0, help=_help("eval_problems") + " Samples: RR_EVAL_SAMPLES.")
    ] = FlywheelParams.eval_problems,
    start_workers: Annotated[
        bool, typer.Option(help="Start and stop worker processes here.")
    ] = True,
) -> None:
    """Run the flywheel; re-running resumes an interrupted run (nothing lost or done twice)."""
    from pipelines.generation import GenerationConfig
    from workers.processes import start_worker, stop_workers

    try:  # the generation config owns the known backends and prompt styles
        GenerationConfig(backend=backend, prompt_style=prompt_style)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if backend == "vllm" and start_workers and find_spec("vllm") is None:
        # Workers started here generate here; remote GPU workers bring their own vLLM.
        raise typer.BadParameter(
            "--backend vllm needs vLLM in this environment (pip install '.[gpu]' on a GPU "
            "machine), or --no-start-workers with GPU workers that have it"
        )
    migrate.upgrade()
    _import_humaneval_if_empty()
    params = FlywheelParams(
        backend=backend,
        prompt_style=prompt_style,
        candidates=candidates,
        policy_steps=policy_steps,
        max_new_tokens=max_new_tokens,
        eval_problems=eval_problems,
    )
    log_dir = get_settings().data_dir.resolve() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # With the embedded broker only the workers started here consume it: a run
    # marked running before they started lost its worker with an earlier run.
    embedded = get_settings().celery_broker_url.startswith("filesystem")
    own_since = utcnow() if start_workers and embedded else None
    groups = QUEUE_GROUPS if start_workers else ()
    # Each worker's torch would start one thread per core: with four workers on
    # two cores, generation and training then oversubscribe the CPU, and OpenMP's
    # spinning threads made a sampling batch 6x slower (3.3 against 20 tokens/s,
    # measured here). Share the cores out instead, unless the user chose.
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(len(groups), 1)))}
    env = {} if "OMP_NUM_THREADS" in os.environ else threads
    workers = [start_worker(q, env=env, log_path=log_dir / f"worker-{q[0]}.log") for q in groups]
    started = time.monotonic()
    try:
        _drive(params, problems, iterations, continuous, own_since)
    except IterationBlocked as error:
        err_console.print(f"error: {error}")
        raise typer.Exit(1) from error
    finally:
        stop_workers(workers)
    with session_scope() as session:
        rows = iteration_rows(session)
        held_out = held_out_table(session)
    print_report(rows)
    print_held_out(held_out)
    console.print(f"wall time {time.monotonic() - started:.0f}s; worker logs in {log_dir}")


def _import_humaneval_if_empty() -> None:
    from app.problem_import import humaneval_rows, upsert_problems

    with session_scope() as session:
        if session.scalar(select(func.count()).select_from(Problem)):
            return
        report = upsert_problems(
            session, humaneval_rows(), eval_fraction=get_settings().eval_fraction
        )
    console.print(f"imported {report.imported} HumanEval problems")


def _drive(
    params: FlywheelParams,
    size: int,
    iterations: int,
    continuous: bool,
    own_since: datetime | None,
) -> None:
    """Finish any unfinished iteration, then open new ones until done."""
    while True:
        with session_scope() as session:
            iteration_id, resumed = iteration_to_follow(
                session, params, size=size, iterations=iterations, continuous=continuous
            )
        if iteration_id is not None:
            # An iteration left unfinished by an earlier, interrupted run: its lost
            # messages are re-enqueued before waiting on it.
            wait_for_iteration(iteration_id, reconcile_first=resumed, own_since=own_since)
        elif continuous:
            time.sleep(10)  # waiting for new problems
        else:
            return


class IterationBlocked(RuntimeError):
    """An iteration that needs a person: `rewardranker train ...` re-enqueues the training."""


def wait_for_iteration(
    iteration_id: int,
    *,
    show: bool = True,
    reconcile_first: bool = False,
    own_since: datetime | None = None,
    timeout_s: float | None = None,
) -> None:
    """Follow the iteration with one progress bar per stage until it is done,
    reconciling every RR_RECONCILE_INTERVAL (as `rewardranker beat` does: both may
    run). A database that is briefly unreachable (a restart) is waited out, not fatal."""
    if reconcile_first:
        # When only workers started at `own_since` exist, a training with no
        # heartbeat since then lost its worker, and nothing queued is in flight.
        stale = utcnow() - own_since if own_since else None
        with session_scope() as session:
            reconcile(session, stale_after=stale, stall_after=timedelta(0))
    interval_s = get_settings().reconcile_interval.total_seconds()
    started = last_reconcile = time.monotonic()
    with Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, disable=not show,
    ) as bars:  # fmt: skip
        stages = {name: bars.add_task(name, total=None) for name in QUEUES}
        while True:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"iteration {iteration_id} not done after {timeout_s:.0f}s")
            try:
                if _poll(bars, stages, iteration_id) == IterationStatus.DONE:
                    return
                with session_scope() as session:
                    blocked = blocked_reason(session, iteration_id)
                if blocked:
                    raise IterationBlocked(f"iteration {iteration_id} is stuck: {blocked}")
                if time.monotonic() - last_reconcile > interval_s:
                    with session_scope() as session:
                        reconcile(session)
                    last_reconcile = time.monotonic()
            except sqlalchemy.exc.OperationalError as error:
                err_console.print(f"store unreachable, retrying: {error.orig}")
            time.sleep(1.0)


def _poll(bars: Progress, stages: dict[str, TaskID], iteration_id: int) -> IterationStatus:
    """Read the iteration's progress, show it, and return its state."""
    with session_scope() as session:
        iteration = session.get(Iteration, iteration_id)
        progress = problem_progress(session, iteration)
        run = session.scalars(
            select(TrainingRun)
            .where(TrainingRun.iteration_id == iteration_id)
            .order_by(TrainingRun.id.desc())
        ).first()
        _update_bars(bars, stages, iteration, progress, run)
        return iteration.status


def _update_bars(bars: Progress, stages: dict[str, TaskID], iteration, progress, run) -> None:
    number = iteration.number
    bars.update(
        stages["generation"],
        description=f"iter {number} generation (problems)",
        completed=progress["generated"],
        total=progress["problems"],
    )
    bars.update(
        stages["execution"],
        description=f"iter {number} execution",
        completed=progress["executed"],
        total=progress["candidates"] or None,
    )
    bars.update(
        stages["labeling"],
        description=f"iter {number} labeling",
        completed=progress["scored"],
        total=progress["judgeable"] or None,
    )
    if run is not None:
        label = "warm-start reward" if run.params.get("warm_start") else run.kind.value
        state = run.status.value
        if run.resumed_from_step is not None:
            state += f", attempt {run.attempt} resumed at step {run.resumed_from_step}"
        bars.update(stages["training"], description=f"iter {number} {label} ({state})",
                    completed=round(run.progress * 100), total=100)  # fmt: skip


def iteration_rows(session: Session) -> list[dict[str, Any]]:
    """Per iteration: what `rewardranker status --json` and the run report show."""
    return [
        {
            **summary,
            "problems": len(summary["params"].get("problem_ids", [])),
            "reward_model_version": summary["reward_model_version_id"],
            "generator_version": summary["generator_version_id"],
            "evaluation": summary["metrics"].get("evaluation", {}),
        }
        for summary in iteration_summaries(session)
    ]
