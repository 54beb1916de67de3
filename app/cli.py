"""The `rewardranker` command line."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import func, select

from app import migrate
from app.console import console, err_console
from app.dataset_cli import dataset_app
from app.flywheel_cli import beat, evaluate, flywheel_app, status, train_app, worker
from app.problem_import import (
    SplitLeak,
    humaneval_rows,
    read_problem_file,
    set_split,
    upsert_problems,
)
from app.query_cli import api, candidates_app, iterations, models, report
from app.sandbox_cli import sandbox_app
from models import Candidate, Execution, HardNegativeLabel, Iteration, ModelVersion, Problem
from models.db import session_scope
from models.enums import Split
from models.settings import get_settings

app = typer.Typer(
    help="RewardRanker flywheel: generate, execute, rerank, retrain.", no_args_is_help=True
)
db_app = typer.Typer(help="The candidate store's schema.", no_args_is_help=True)
problems_app = typer.Typer(help="Problems and their tests.", no_args_is_help=True)
store_app = typer.Typer(help="The candidate store.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(problems_app, name="problems")
app.add_typer(store_app, name="store")
app.add_typer(dataset_app, name="dataset")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(flywheel_app, name="flywheel")
app.add_typer(train_app, name="train")
app.command("status")(status)
app.command("evaluate")(evaluate)
app.command("worker")(worker)
app.command("beat")(beat)
app.add_typer(candidates_app, name="candidates")
app.command("iterations")(iterations)
app.command("models")(models)
app.command("api")(api)
app.command("report")(report)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    migrate.upgrade(revision=revision)
    console.print(f"schema at {revision}")


@problems_app.command("import")
def problems_import(
    source: Annotated[
        str, typer.Argument(help="'humaneval' or a JSONL file (MultiPL-E or native).")
    ],
) -> None:
    """Import problems; re-importing is harmless. Bad lines are reported, good ones kept."""
    migrate.upgrade()
    if source == "humaneval":
        rows, errors = humaneval_rows(), []
    else:
        path = Path(source)
        if not path.is_file():
            err_console.print(
                f"error: {source}: no such file (expected 'humaneval' or a JSONL file)"
            )
            raise typer.Exit(2)
        rows, errors = read_problem_file(path)
    with session_scope() as session:
        report = upsert_problems(session, rows, eval_fraction=get_settings().eval_fraction)
    console.print(f"imported {report.imported} problems, {report.unchanged} already stored")
    for error in errors:
        err_console.print(f"error: {source}: {error}")
    if errors:
        err_console.print(f"{len(errors)} line(s) rejected")
        raise typer.Exit(1)


@problems_app.command("split")
def problems_split(
    task_ids: Annotated[
        list[str] | None, typer.Argument(help="Task ids to move (with --set); none: show.")
    ] = None,
    set_to: Annotated[
        Split | None, typer.Option("--set", help="Move TASK_IDS to this split.")
    ] = None,
    source: Annotated[str, typer.Option(help="Source of TASK_IDS.")] = "humaneval",
) -> None:
    """Show the train/eval split per source and language, or move problems with --set.

    Holding out a problem that training already sampled is refused: it would leak.
    """
    migrate.upgrade()
    if set_to is not None:
        if not task_ids:
            err_console.print("error: --set needs the task ids to move")
            raise typer.Exit(2)
        try:
            with session_scope() as session:
                changed = set_split(session, source=source, task_ids=task_ids, split=set_to)
        except (SplitLeak, ValueError) as error:
            err_console.print(f"error: {error}")
            raise typer.Exit(1) from None
        console.print(f"moved {changed} problem(s) to {set_to}")
        return
    with session_scope() as session:
        rows = session.execute(
            select(Problem.source, Problem.language, Problem.split, func.count())
            .group_by(Problem.source, Problem.language, Problem.split)
            .order_by(Problem.source, Problem.language, Problem.split)
        ).all()
    table = Table("source", "language", "split", "problems", title="held-out split")
    for row_source, language, split, count in rows:
        table.add_row(row_source, str(language), str(split), str(count))
    console.print(table)


@store_app.command("summary")
def store_summary() -> None:
    """Counts of what the store holds."""
    migrate.upgrade()
    with session_scope() as session:
        counts = {
            "problems": session.scalar(select(func.count()).select_from(Problem)),
            "candidates": session.scalar(select(func.count()).select_from(Candidate)),
            "executions": session.scalar(select(func.count()).select_from(Execution)),
            "hard negatives": session.scalar(select(func.count()).select_from(HardNegativeLabel)),
            "iterations": session.scalar(select(func.count()).select_from(Iteration)),
            "model versions": session.scalar(select(func.count()).select_from(ModelVersion)),
        }
        by_language = session.execute(
            select(Problem.language, func.count()).group_by(Problem.language)
        ).all()
    table = Table("what", "count", title="candidate store")
    for name, count in counts.items():
        table.add_row(name, str(count))
    for language, count in by_language:
        table.add_row(f"  problems in {language}", str(count))
    console.print(table)
