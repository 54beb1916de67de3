"""`rewardranker dataset ...`: the DVC-versioned datasets of the iterations."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import select

from app import migrate
from app.console import console, err_console
from models import DatasetVersion, Iteration
from models.db import session_scope
from models.settings import get_settings

dataset_app = typer.Typer(help="DVC-versioned datasets of the iterations.", no_args_is_help=True)


@dataset_app.command("list")
def dataset_list() -> None:
    """The versioned iterations: tag, commit and row counts."""
    migrate.upgrade()
    with session_scope() as session:
        rows = session.execute(
            select(Iteration.number, DatasetVersion)
            .join(Iteration, Iteration.id == DatasetVersion.iteration_id)
            .order_by(Iteration.number)
        ).all()
        table = Table("iteration", "tag", "commit", "pairs", "candidates", "hard negatives")
        for number, version in rows:
            counts = version.counts
            table.add_row(
                str(number),
                version.dvc_tag or "",
                (version.git_rev or "")[:10],
                str(counts.get("pairs", "")),
                str(counts.get("candidates", "")),
                str(counts.get("hard_negatives", "")),
            )
    console.print(table)


@dataset_app.command("version")
def dataset_version(
    iteration: Annotated[int, typer.Argument(help="Iteration number to version.")],
) -> None:
    """Export, commit and tag one iteration's dataset now (harmless if already done)."""
    from pipelines.datasets import version_iteration

    migrate.upgrade()
    settings = get_settings()
    with session_scope() as session:
        iteration_id = session.scalar(select(Iteration.id).where(Iteration.number == iteration))
        if iteration_id is None:
            err_console.print(f"error: no iteration number {iteration}")
            raise typer.Exit(1)
        version = version_iteration(
            session, iteration_id, data_dir=settings.data_dir, remote=settings.dvc_remote
        )
        console.print(f"{version.dvc_tag} at {version.git_rev}: {version.counts}")


@dataset_app.command("train-reward")
def train_reward(
    pairs: Annotated[Path, typer.Option(help="Parquet file of training pairs.", exists=True)],
    out: Annotated[Path, typer.Option(help="Folder to write the trained reward model to.")],
    backbone: Annotated[
        str | None, typer.Option(help="Model spec; default: RR_REWARD_MODEL.")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option(min=0.01, help="Default: the training method's own.")
    ] = None,
    seed: int = 0,
    metrics: Annotated[
        Path | None, typer.Option(help="Also write the training metrics to this JSON file.")
    ] = None,
) -> None:
    """Train a reward model on a pairs Parquet file (the `dvc repro` stage)."""
    import pyarrow.parquet as pq

    from pipelines.loading import write_then_rename
    from pipelines.pairs import Pair
    from pipelines.reward_model import RewardConfig, train_reward_model

    columns = ["problem_id", "prompt", "chosen", "rejected"]
    rows = pq.read_table(pairs, columns=columns).to_pylist()
    if not rows:
        err_console.print(f"error: {pairs} holds no pairs")
        raise typer.Exit(1)
    config = RewardConfig(
        backbone=backbone or get_settings().reward_model, epochs=epochs, seed=seed
    )
    result = write_then_rename(
        out, lambda staging: train_reward_model([Pair(**row) for row in rows], config, staging)
    )
    if metrics is not None:
        metrics.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    console.print(f"trained on {len(rows)} pairs: {result}")
