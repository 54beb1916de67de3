"""The Markdown report and its plots."""

from app.report import PLOTS, plot_png, write_report
from tests.app.conftest import seed_held_out, seed_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_on_a_seeded_store(pg_session, tmp_path):
    seed_held_out(pg_session, seed_store(pg_session))
    report = write_report(pg_session, tmp_path / "out")
    text = report.read_text()
    # Iteration 1: random 0.3, reranked 0.5, oracle 0.8, reward model accuracy 0.61.
    assert "| 1 | open | 6 | 1 | 0.300 | 0.500 | 0.800 | 0.610 |" in text
    assert "| rm-v2 | 0.740 |" in text
    # The paper's table comes first: half the held-out problems pass one draw in 4.
    assert text.index("## Held-out evaluation") < text.index("## Iterations")
    assert "| base | generator | 0.125 [" in text
    assert "| after iteration 1 | reranked | 0.500 [" in text
    # Paired over the 4 problems: reranking at evaluation 0 (tied scores) changes
    # nothing; +0.375 overall, yet a resample of only the odd problems (1 in 16)
    # shows none, so the 95% interval reaches 0.
    assert "- within noise: reranked against the generator alone at evaluation 0 +0.000" in text
    assert "within noise: reranked at evaluation 1 against the generator alone at " in text
    assert "+0.375 [+0.000, +0.750] (pass@1, paired over the same 4 held-out problems" in text
    for name, (title, _) in PLOTS.items():
        assert f"## {title}" in text and f"![{title}]({name}.png)" in text
        png = (tmp_path / "out" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_plots_of_an_empty_store_say_so_instead_of_failing(pg_session, tmp_path):
    empty = {name: plot_png(pg_session, name) for name in PLOTS}
    assert all(png.startswith(PNG_MAGIC) for png in empty.values())
    seed_held_out(pg_session, seed_store(pg_session))
    # Once there is data the pictures change: the data is what gets drawn.
    assert all(plot_png(pg_session, name) != png for name, png in empty.items())
    text = write_report(pg_session, tmp_path / "r").read_text()
    assert "| 2 | open | 4 | 0 | 0.400 | 0.600 | 0.850 | 0.740 |" in text
