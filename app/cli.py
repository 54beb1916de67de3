"""The `rewardranker` command line."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import func, select

from app import migrate
from app.console import console, err_console
from app.dataset_cli import dataset_app
from app.flywheel_cli import flywheel_app, status, train_app, worker
from app.problem_import import humaneval_rows, read_problem_file, upsert_problems
from app.query_cli import api, candidates_app, iterations, models, report
from app.sandbox_cli import sandbox_app
from models import Candidate, Execution, HardNegativeLabel, Iteration, ModelVersion, Problem
from models.db import session_scope

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
app.command("worker")(worker)
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
        report = upsert_problems(session, rows)
    console.print(f"imported {report.imported} problems, {report.unchanged} already stored")
    for error in errors:
        err_console.print(f"error: {source}: {error}")
    if errors:
        err_console.print(f"{len(errors)} line(s) rejected")
        raise typer.Exit(1)


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
