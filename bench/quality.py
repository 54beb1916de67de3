"""Does a turn of the flywheel make code better? The paper's table, measured.

Runs the real flywheel (`rewardranker flywheel run`, embedded SQLite and broker,
its own worker processes) with the bundled SmolLM2 model in a fresh data folder:
the baseline evaluation, then iterations of generate -> execute -> score and mine
-> retrain the reward model -> PPO update -> evaluate. Every evaluation samples
the same held-out problems (the `eval` split, which no training step sees), so
the rows are paired. It prints the table with 95% bootstrap intervals and the
paired changes, and says whether each is within noise, then saves every program it judged (held-out
draws and training candidates, with verdicts and scores) compressed under
bench/data/, so the reward-model half can be redone on a CPU from them.

    .venv/bin/python bench/quality.py --preset cpu     # what fits on 2 CPU cores
    .venv/bin/python bench/quality.py --preset gpu     # 164 x 16 on one GPU
    .venv/bin/python bench/quality.py --quick          # a smoke run, minutes
    .venv/bin/python bench/quality.py --collect var    # a finished run's table and samples

Sizes can be overridden one by one (--problems, --candidates, ...). The last line
is `RESULT evaluations=N held_out_problems=N base_pass1=X final_reranked_pass1=X
reranking_change=X generator_change=X flywheel_change=X overall_change=X
change=better|worse|within_noise wall_s=X`: each `*_change` a paired difference of
pass@1 from the first evaluation to the last (see README, "The held-out table"),
`change` the verdict on the last.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# problems/candidates: training problems per iteration and samples each;
# eval_problems (0: all held-out) x eval_samples: each evaluation's draws.
PRESETS = {
    "gpu": dict(problems=82, candidates=16, eval_problems=0, eval_samples=16, iterations=2,
                max_new_tokens=256, policy_steps=4),
    # what `make demo` runs
    "cpu": dict(problems=2, candidates=4, eval_problems=4, eval_samples=4, iterations=2,
                max_new_tokens=96, policy_steps=1),
    "quick": dict(problems=2, candidates=2, eval_problems=2, eval_samples=2, iterations=1,
                  max_new_tokens=32, policy_steps=0),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    for name in PRESETS["cpu"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="overrides the preset")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--data-dir", type=Path, help="default: a fresh temporary folder")
    parser.add_argument(
        "--collect",
        type=Path,
        metavar="DATA_DIR",
        help="run nothing: read the table and samples of a finished run's data folder",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "data")
    args = parser.parse_args()
    sizes = dict(PRESETS["quick" if args.quick else args.preset])
    sizes.update({k: v for k in sizes if (v := getattr(args, k)) is not None})
    if args.collect:
        finish(args.collect, args.out, {"collected_from": str(args.collect)}, wall=None)
        return
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="rr-quality-"))

    env = {k: v for k, v in os.environ.items() if not k.startswith("RR_")}
    env |= {"RR_DATA_DIR": str(data_dir), "RR_EVAL_SAMPLES": str(sizes["eval_samples"])}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # generation and training pick CUDA when they see it
    command = [
        str(Path(sys.executable).with_name("rewardranker")), "flywheel", "run",
        "--problems", str(sizes["problems"]), "--candidates", str(sizes["candidates"]),
        "--iterations", str(sizes["iterations"]), "--eval-problems", str(sizes["eval_problems"]),
        "--max-new-tokens", str(sizes["max_new_tokens"]),
        "--policy-steps", str(sizes["policy_steps"]),
    ]  # fmt: skip
    print(f"sizes {sizes}; data in {data_dir}", flush=True)
    started = time.monotonic()
    subprocess.run(command, env=env, check=True)
    finish(data_dir, args.out, sizes, wall=time.monotonic() - started)


def finish(data_dir: Path, out: Path, sizes: dict, *, wall: float | None) -> None:
    """Read the run's store (embedded SQLite), save its judged programs, report."""
    os.environ.update({"RR_DATA_DIR": str(data_dir), "RR_DATABASE_URL": ""})
    from models.db import session_scope

    with session_scope() as session:
        table, samples = collect(session)
    path = save_samples(out, sizes, samples)
    print(f"saved {len(samples)} judged programs to {path}")
    report(table, wall)


def collect(session) -> tuple[dict, list[dict]]:
    """The held-out table and every judged program, as the flywheel stored them."""
    from sqlalchemy import select

    from app.queries import held_out_table
    from models import Candidate, Evaluation, EvaluationSample, Execution, Problem, Score

    table = held_out_table(session)
    reward_of = {e.id: e.reward_model_version_id for e in session.scalars(select(Evaluation))}
    rows = session.execute(
        select(Candidate, Problem.task_id, Problem.split, Execution.verdict)
        .join(Problem, Problem.id == Candidate.problem_id)
        .join(Execution, Execution.candidate_id == Candidate.id)
        .order_by(Candidate.id)
    ).all()
    scores: dict[int, dict[int, float]] = {}
    for candidate_id, version, score in session.execute(
        select(Score.candidate_id, Score.reward_model_version_id, Score.score)
    ):
        scores.setdefault(candidate_id, {})[version] = score
    draws: dict[int, list[dict]] = {}
    for sample in session.scalars(select(EvaluationSample)):
        draws.setdefault(sample.candidate_id, []).append(
            {
                "evaluation_id": sample.evaluation_id,
                "sample_index": sample.sample_index,
                "score": scores.get(sample.candidate_id, {}).get(reward_of[sample.evaluation_id]),
            }
        )
    samples = [
        {
            "task_id": task_id,
            "split": str(split),
            "origin": str(candidate.origin),
            "iteration_id": candidate.iteration_id,
            "generator_version_id": candidate.generator_version_id,
            "verdict": str(verdict),
            "code": candidate.code,
            "scores": scores.get(candidate.id, {}),
            "draws": draws.get(candidate.id, []),
        }
        for candidate, task_id, split, verdict in rows
    ]
    return table, samples


def save_samples(folder: Path, sizes: dict, samples: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    scale = f"p{sizes['problems']}x{sizes['candidates']}" if "problems" in sizes else "collected"
    path = folder / f"quality-{stamp}-{scale}.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"sizes": sizes}) + "\n")
        for sample in samples:
            handle.write(json.dumps(sample) + "\n")
    return path


def report(table: dict, wall: float | None) -> None:
    from app.flywheel_cli import print_held_out

    print_held_out(table)
    wall_s = "n/a" if wall is None else f"{wall:.0f}"
    if not table["rows"]:
        print(f"RESULT evaluations=0 wall_s={wall_s}")
        return
    first = next(r for r in table["rows"] if r["row"] == "generator")["cells"]["all"]
    last = [r for r in table["rows"] if r["row"] == "reranked"][-1]["cells"]["all"]
    change = table["verdict"].split(":", 1)[0].replace(" ", "_")
    problems = max(e["problems"] for e in table["evaluations"])
    changes = " ".join(
        f"{c['change']}_change={c['difference']['value']:+.3f}" for c in table["changes"]
    )
    print(
        f"RESULT evaluations={len(table['evaluations'])} held_out_problems={problems} "
        f"base_pass1={first['value']:.3f} final_reranked_pass1={last['value']:.3f} "
        f"{changes} change={change} wall_s={wall_s}"
    )


if __name__ == "__main__":
    main()
