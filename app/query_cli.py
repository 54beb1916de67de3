"""`rewardranker candidates|iterations|models|api|report`: the API's queries from a
terminal. Rich tables for people; JSON and CSV for pipes."""

import csv
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.syntax import Syntax
from rich.table import Table

from app import migrate, queries
from app.console import console, err_console
from models.db import session_scope
from models.enums import Language, ModelKind, Origin, Verdict

candidates_app = typer.Typer(help="Query the candidate store.", no_args_is_help=True)


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


FormatOption = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table for people; json or csv for pipes.")
]


def _emit(
    rows: list[dict[str, Any]],
    columns: tuple[str, ...],
    fmt: OutputFormat,
    title: str,
    table_columns: tuple[str, ...] | None = None,
) -> None:
    """JSON, CSV with every column, or a Rich table of `table_columns` (narrower, for people)."""
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps(rows, default=str, indent=2) + "\n")
    elif fmt is OutputFormat.CSV:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(queries.candidate_row_values(row, columns) for row in rows)
    else:
        shown = table_columns or columns
        table = Table(title=title)
        for name in shown:
            # Ids and verdicts are looked up verbatim: never cut them short.
            table.add_column(name, no_wrap=name in ("id", "verdict"), overflow="fold")
        for row in rows:
            table.add_row(*(_cell(value) for value in queries.candidate_row_values(row, shown)))
        console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


CANDIDATE_TABLE_COLUMNS = (
    "id",
    "task_id",
    "language",
    "origin",
    "iteration",
    "verdict",
    "score",
    "reward_model_version_id",  # whose score: by default, each candidate's iteration's
    "hard_negative",
)


@candidates_app.command("list")
def candidates_list(
    problem_id: Annotated[int | None, typer.Option(help="Problem id.")] = None,
    language: Annotated[Language | None, typer.Option()] = None,
    iteration: Annotated[int | None, typer.Option(help="Iteration number.")] = None,
    verdict: Annotated[Verdict | None, typer.Option()] = None,
    hard_negative: Annotated[
        bool | None, typer.Option("--hard-negative/--not-hard-negative", help="Labelled or not.")
    ] = None,
    tampered: Annotated[
        bool | None,
        typer.Option(
            "--tampered/--not-tampered", help="Runs the sandbox caught forging OK or not."
        ),
    ] = None,
    origin: Annotated[Origin | None, typer.Option()] = None,
    generator_version: Annotated[
        int | None, typer.Option(help="Generator model version id.")
    ] = None,
    reward_version: Annotated[
        int | None,
        typer.Option(
            help="Reward model version whose scores to use (default: each candidate's "
            "iteration's reward model, the one that scored it in its iteration)."
        ),
    ] = None,
    min_score: Annotated[float | None, typer.Option()] = None,
    max_score: Annotated[float | None, typer.Option()] = None,
    sort: Annotated[str, typer.Option(help="time, -time, score or -score.")] = "-time",
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="next cursor printed by the previous page.")
    ] = None,
    fmt: FormatOption = OutputFormat.TABLE,
) -> None:
    """Candidates with filters, newest first by default; prints the next page's cursor on stderr."""
    if sort not in queries.SORTS:
        err_console.print(f"error: --sort must be one of {', '.join(queries.SORTS)}, got {sort!r}")
        raise typer.Exit(2)
    try:
        flt = queries.CandidateFilter(
            problem_id=problem_id,
            language=language,
            iteration=iteration,
            verdict=verdict,
            hard_negative=hard_negative,
            tampered=tampered,
            origin=origin,
            generator_version_id=generator_version,
            reward_model_version_id=reward_version,
            min_score=min_score,
            max_score=max_score,
            sort=sort,
        )
    except ValidationError as error:  # the filter's bounds, as the API applies them
        for problem in error.errors():
            err_console.print(
                f"error: --{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}"
            )
        raise typer.Exit(2) from None
    migrate.upgrade()
    with session_scope() as session:
        try:
            page = queries.list_candidates(session, flt, limit=limit, cursor=cursor)
        except queries.QueryError as error:
            err_console.print(f"error: {error}")
            raise typer.Exit(2) from None
    _emit(page.items, queries.CANDIDATE_COLUMNS, fmt, "candidates", CANDIDATE_TABLE_COLUMNS)
    if page.next_cursor:
        err_console.print(f"more: --cursor {page.next_cursor}")


@candidates_app.command("show")
def candidates_show(candidate_id: int, fmt: FormatOption = OutputFormat.TABLE) -> None:
    """Code, execution, scores, labels and lineage of one candidate."""
    migrate.upgrade()
    with session_scope() as session:
        detail = queries.candidate_detail(session, candidate_id)
    if detail is None:
        err_console.print(f"error: no candidate {candidate_id}")
        raise typer.Exit(1)
    if fmt is not OutputFormat.TABLE:
        sys.stdout.write(json.dumps(detail, default=str, indent=2) + "\n")
        return
    execution = detail["execution"] or {}
    lineage = detail["lineage"]
    summary = Table(show_header=False, title=f"candidate {candidate_id}")
    for name, value in (
        ("problem", f"{detail['problem']['task_id']} ({detail['problem']['language']})"),
        ("origin", detail["origin"]),
        ("verdict", execution.get("verdict", "not executed")),
        (
            "tests",
            f"{execution.get('tests_passed')}/{execution.get('tests_total')}" if execution else "",
        ),
        (
            "scores",
            ", ".join(
                f"v{s['reward_model_version_id']}: {s['score']:.4f}" for s in detail["scores"]
            ),
        ),
        (
            "hard negative",
            ", ".join(
                f"v{label['reward_model_version_id']} {label['rule']}"
                for label in detail["hard_negative_labels"]
            ),
        ),
        ("generator", lineage["generator"]["name"] if lineage["generator"] else ""),
        ("iteration", "" if lineage["iteration"] is None else str(lineage["iteration"])),
        ("datasets", ", ".join(d["dvc_tag"] or d["path"] for d in lineage["dataset_versions"])),
    ):
        summary.add_row(name, value)
    console.print(summary)
    console.print(Syntax(detail["code"], detail["problem"]["language"], line_numbers=True))


ITERATION_COLUMNS = (
    "number",
    "status",
    "candidates",
    "hard_negatives",
    *queries.ITERATION_METRIC_KEYS,
)


def iterations(fmt: FormatOption = OutputFormat.TABLE) -> None:
    """Iterations with their metrics, candidate and hard-negative counts."""
    migrate.upgrade()
    with session_scope() as session:
        rows = queries.iteration_summaries(session)
    if fmt is OutputFormat.JSON:
        _emit(rows, ITERATION_COLUMNS, fmt, "iterations")
        return
    flat = [{**row, **row["headline"]} for row in rows]
    for row in flat:
        if isinstance(row["pass_at_k"], dict):
            row["pass_at_k"] = " ".join(
                f"@{k}:{v:.3f}" for k, v in row["pass_at_k"].items() if v is not None
            )
    _emit(flat, ITERATION_COLUMNS, fmt, "iterations")


MODEL_COLUMNS = ("id", "kind", "name", "parent_id", "status", "base_model", "path", "created_at")


def models(
    kind: Annotated[ModelKind | None, typer.Option(help="generator or reward.")] = None,
    fmt: FormatOption = OutputFormat.TABLE,
) -> None:
    """Registered model versions, oldest first."""
    migrate.upgrade()
    with session_scope() as session:
        rows = queries.list_models(session, kind)
    _emit(
        rows,
        (*MODEL_COLUMNS, "metrics") if fmt is OutputFormat.JSON else MODEL_COLUMNS,
        fmt,
        "models",
    )


def api(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default RR_API_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default RR_API_PORT, 8000).")] = None,
) -> None:
    """Serve the HTTP API and dashboard with uvicorn. Off loopback, RR_API_TOKEN is required."""
    import uvicorn

    from app.api import create_app
    from models.settings import Settings

    overrides = {k: v for k, v in (("api_host", host), ("api_port", port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        for problem in error.errors():
            err_console.print(f"error: {problem['msg']}")
        raise typer.Exit(2) from None
    migrate.upgrade()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port)


def report(
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md and the PNG plots.")],
) -> None:
    """Write a Markdown report with plots of the flywheel's progress."""
    from app.report import write_report

    migrate.upgrade()
    with session_scope() as session:
        path = write_report(session, out)
    console.print(f"wrote {path}")
