"""`rewardranker sandbox run|doctor`."""

import json
from pathlib import Path
from typing import Annotated

import typer

from pipelines.sandbox import Limits, SandboxUnavailable, run_one
from pipelines.sandbox.doctor import diagnose
from pipelines.sandbox.languages import recipe_for

sandbox_app = typer.Typer(help="Run candidate programs in the sandbox.", no_args_is_help=True)


def _usage_error(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise _usage_error(f"cannot read {what} {path}: {error.strerror or error}") from None


@sandbox_app.command("run")
def run(
    language: Annotated[
        str, typer.Option(help="python, cpp, java, javascript, typescript, php, csharp or bash.")
    ],
    code: Annotated[Path, typer.Option(help="File with the candidate program.")],
    tests: Annotated[Path, typer.Option(help="File with the tests appended after the code.")],
    io: Annotated[
        Path | None, typer.Option(help='JSON list of {"input": ..., "output": ...} stdin cases.')
    ] = None,
    timeout: Annotated[float, typer.Option(help="Wall-clock seconds per run.")] = Limits.timeout_s,
    memory_mb: Annotated[
        int, typer.Option(help="Memory of the whole sandbox, MiB.")
    ] = Limits.memory_mb,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run one candidate and print its verdict; exit 0 whatever the verdict."""
    try:
        recipe_for(language)
    except ValueError as error:
        raise _usage_error(str(error)) from None
    code_text, tests_text = _read(code, "code file"), _read(tests, "tests file")
    io_cases = None
    if io is not None:
        try:
            io_cases = json.loads(_read(io, "io cases file"))
        except ValueError as error:
            raise _usage_error(f"{io}: not JSON: {error}") from None
        if not isinstance(io_cases, list) or not all(
            isinstance(c, dict) and {"input", "output"} <= set(c) for c in io_cases
        ):
            raise _usage_error(f'{io}: expected a list of {{"input": ..., "output": ...}} objects')
    limits = Limits(timeout_s=timeout, memory_mb=memory_mb)
    try:
        result = run_one(language, code_text, tests_text, io_cases=io_cases, limits=limits)
    except SandboxUnavailable as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(3) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    total = "" if result.total is None else f" ({result.passed}/{result.total})"
    typer.echo(f"{result.verdict}{total} in {result.duration_ms:.0f} ms")
    if result.stderr_tail:
        typer.echo(result.stderr_tail, err=True)


@sandbox_app.command("doctor")
def doctor() -> None:
    """Print which isolation layers are active on this host; exit 1 if any is not."""
    layers = diagnose()
    for layer in layers:
        mark = "ok  " if layer.active else "MISS"
        typer.echo(f"[{mark}] {layer.name:<26} {layer.detail}")
    if not all(layer.active for layer in layers):
        raise typer.Exit(1)
