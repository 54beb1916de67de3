"""The flywheel report: Markdown with PNG plots, also served by the dashboard.

Plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, not
through pyplot, so no GUI backend is needed and the API's threads share no
global figure state."""

import io
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sqlalchemy.orm import Session

from app import queries
from models.enums import Verdict
from pipelines.evaluation import change_text


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _empty(axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def held_out_figure(session: Session) -> Figure:
    """The paper's question: pass@1 on held-out problems, generator alone and
    reranked, per evaluation, with 95% bootstrap intervals (all languages)."""
    table = queries.held_out_table(session)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    if not table["rows"]:
        _empty(axes, "no held-out evaluation has finished yet")
    else:
        for offset, (row_name, label) in enumerate(
            (("generator", "generator alone"), ("reranked", "reranked best-of-N"))
        ):
            cells = [
                (row["evaluation"] + (offset - 0.5) * 0.15, row["cells"]["all"])
                for row in table["rows"]
                if row["row"] == row_name and row["cells"]["all"] is not None
            ]
            axes.errorbar(
                [x for x, _ in cells],
                [c["value"] for _, c in cells],
                yerr=[
                    [c["value"] - c["low"] for _, c in cells],
                    [c["high"] - c["value"] for _, c in cells],
                ],
                marker="o",
                capsize=4,
                linestyle="-",
                label=label,
            )
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("evaluation (0: base models; N: after iteration N)")
        axes.set_ylabel("pass@1, held-out problems")
        axes.set_ylim(0, 1)
        axes.legend()
    axes.set_title("held-out pass@1 with 95% intervals")
    return figure


def pass1_figure(session: Session) -> Figure:
    """Random vs reranked pass@1 and the oracle (any of N passes) per iteration."""
    summaries = queries.iteration_summaries(session)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    plotted = False
    for key, label in (
        ("random_pass1", "random pass@1"),
        ("reranked_pass1", "reranked pass@1"),
        ("oracle_pass_n", "oracle pass@N"),
    ):
        points = [
            (s["number"], s["headline"][key]) for s in summaries if s["headline"][key] is not None
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=label)
            plotted = True
    if not plotted:
        _empty(axes, "no iteration has evaluation metrics yet")
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("iteration")
        axes.set_ylabel("pass rate")
        axes.set_ylim(0, 1)
        axes.legend()
    axes.set_title("pass@1: random vs reranked vs oracle")
    return figure


def hard_negatives_figure(session: Session) -> Figure:
    summaries = queries.iteration_summaries(session)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    if not summaries:
        _empty(axes, "no iterations yet")
    else:
        axes.bar([str(s["number"]) for s in summaries], [s["hard_negatives"] for s in summaries])
        axes.set_xlabel("iteration")
        axes.set_ylabel("hard negatives")
    axes.set_title("hard negatives mined per iteration")
    return figure


def verdict_mix_figure(session: Session) -> Figure:
    """Share of each verdict among the iteration's executed candidates."""
    summaries = queries.iteration_summaries(session)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    if not any(s["verdicts"] for s in summaries):
        _empty(axes, "no executed candidates yet")
    else:
        labels = [str(s["number"]) for s in summaries]
        bottom = [0.0] * len(summaries)
        for verdict in Verdict:
            shares = [
                s["verdicts"].get(verdict.value, 0) / max(sum(s["verdicts"].values()), 1)
                for s in summaries
            ]
            if any(shares):
                axes.bar(labels, shares, bottom=bottom, label=verdict.value)
                bottom = [b + x for b, x in zip(bottom, shares, strict=True)]
        axes.set_xlabel("iteration")
        axes.set_ylabel("share of candidates")
        axes.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    axes.set_title("verdict mix per iteration")
    return figure


def reward_accuracy_figure(session: Session) -> Figure:
    accuracies = queries.reward_model_accuracies(session)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    if not accuracies:
        _empty(axes, "no reward model has recorded pairwise_accuracy yet")
    else:
        axes.plot([f"v{v}" for v, _, _ in accuracies], [a for _, _, a in accuracies], marker="o")
        axes.set_xlabel("reward model version")
        axes.set_ylabel("pairwise accuracy")
        axes.set_ylim(0, 1)
    axes.set_title("reward model pairwise accuracy per version")
    return figure


def score_distribution_figure(session: Session) -> Figure:
    """Scores passing vs failing candidates got from their own iteration's reward
    model: the further apart, the better the flywheel's reward models rerank."""
    samples = queries.score_samples(session)
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    if not samples["passing"] and not samples["failing"]:
        _empty(axes, "no scored, executed candidates yet")
    else:
        for name in ("passing", "failing"):
            if samples[name]:
                axes.hist(samples[name], bins=40, alpha=0.6, label=f"{name} ({len(samples[name])})")
        axes.set_xlabel("reward score")
        axes.set_ylabel("candidates")
        axes.legend()
    axes.set_title("score distribution: passing vs failing")
    return figure


PLOTS: dict[str, tuple[str, Callable[[Session], Figure]]] = {
    "held_out": ("Held-out pass@1 per evaluation, with 95% intervals", held_out_figure),
    "pass1": (
        "Random vs reranked vs oracle pass@1 on each iteration's own training problems",
        pass1_figure,
    ),
    "hard_negatives": ("Hard negatives per iteration", hard_negatives_figure),
    "reward_accuracy": ("Reward-model pairwise accuracy per version", reward_accuracy_figure),
    "verdicts": ("Verdict mix per iteration", verdict_mix_figure),
    "scores": ("Score distributions of passing vs failing candidates", score_distribution_figure),
}


def plot_png(session: Session, name: str) -> bytes:
    return _png(PLOTS[name][1](session))


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def _held_out_lines(table: dict[str, Any]) -> list[str]:
    """The paper's table in Markdown: pass@1 on held-out problems, 95% intervals."""
    lines = ["## Held-out evaluation (pass@1, 95% bootstrap interval over problems)", ""]
    if not table["rows"]:
        return [*lines, "No evaluation has finished yet."]
    lines += [
        "| evaluation | row | " + " | ".join(table["columns"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in table["columns"]) + " |",
    ]
    for row in table["rows"]:
        cells = [queries.interval_text(row["cells"][column]) for column in table["columns"]]
        name = "base" if row["evaluation"] == 0 else f"after iteration {row['evaluation']}"
        lines.append(f"| {name} | {row['row']} | " + " | ".join(cells) + " |")
    changes = [f"- {change_text(change)}" for change in table["changes"][:-1]]
    return [*lines, "", *changes, "", table["verdict"]]


def write_report(session: Session, out_dir: Path) -> Path:
    """Write `report.md` and one PNG per plot into `out_dir`; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = queries.iteration_summaries(session)
    lines = [
        "# RewardRanker flywheel report",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        *_held_out_lines(queries.held_out_table(session)),
        "",
        "## Iterations (figures on each iteration's own training problems)",
        "",
        "| iteration | status | candidates | hard negatives | random pass@1 | reranked pass@1 "
        "| oracle pass@N | RM pairwise acc. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        m = s["headline"]
        lines.append(
            f"| {s['number']} | {s['status']} | {s['candidates']} | {s['hard_negatives']} "
            f"| {_fmt(m.get('random_pass1'))} | {_fmt(m.get('reranked_pass1'))} "
            f"| {_fmt(m.get('oracle_pass_n'))} | {_fmt(m.get('reward_pairwise_accuracy'))} |"
        )
    if not summaries:
        lines.append("| (none yet) | | | | | | | |")
    lines += [
        "",
        "## Reward models",
        "",
        "| version | name | pairwise accuracy |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {v} | {n} | {a:.3f} |" for v, n, a in queries.reward_model_accuracies(session)]
    for name, (title, draw) in PLOTS.items():
        (out_dir / f"{name}.png").write_bytes(_png(draw(session)))
        lines += ["", f"## {title}", "", f"![{title}]({name}.png)"]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
