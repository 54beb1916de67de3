"""The paper's open questions on the model-free set: hard against random
negatives, and three iterations against two.

    .venv/bin/python bench/ablations.py --quick   # tiny test model, 24 problems
    .venv/bin/python bench/ablations.py           # bundled SmolLM2, 164 problems

The data and split are those of `bench/reward.py` (mutation candidates of the
HumanEval references, judged in the sandbox, split by `split_for`). An
iteration here is: train the reward model (`RewardConfig()` defaults, or
`--option`), score fresh mutation candidates of the train split (a new seed,
none seen before), mine negatives among the failing ones, add them and the
fresh passing candidates to the training set, retrain. The mined negatives
come first in each problem's pairs, as `build_pairs` orders them.

- hard: `pipelines.mining` `above_lowest_passing` (failing candidates scored
  at or above the problem's lowest passing one, else above its 0.9 quantile).
- random: the `random` rule, at the rate that picks as many negatives as hard
  mining did in the same round (so the two differ in which, not how many).

Every model is measured on the same eval-split candidates with
`held_out_metrics` (95% bootstrap intervals over problems). Last line:
`RESULT key=value ...`.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.reward import (  # noqa: E402
    OPTIONS,
    backbone_for,
    fmt,
    load,
    mutation_candidates,
    paired_text,
    rerank,
    train_pairs,
)
from pipelines.mining import (  # noqa: E402
    RULE_ABOVE_LOWEST_PASSING,
    RULE_RANDOM,
    MiningPolicy,
    ScoredCandidate,
    mine_hard_negatives,
)
from pipelines.reward_model import RewardConfig, RewardScorer, train_reward_model  # noqa: E402


def fresh_candidates(problems: list[dict], seed: int, n: int) -> list[dict]:
    """Up to `n` new mutants per problem (seed `seed`), judged, none seen before."""
    drawn = mutation_candidates([p["problem_id"] for p in problems], 3 * n, seed)
    by_id = {p["problem_id"]: p for p in drawn}
    fresh = []
    for problem in problems:
        seen = set(problem["codes"]) | set(problem["mined"]) | {problem["reference"]}
        new = [
            (code, ok)
            for code, ok in zip(
                by_id[problem["problem_id"]]["codes"],
                by_id[problem["problem_id"]]["passed"],
                strict=True,
            )
            if code not in seen
        ][:n]
        fresh.append(
            {
                "problem_id": problem["problem_id"],
                "codes": [c for c, _ in new],
                "passed": [ok for _, ok in new],
            }
        )
    return fresh


def pairs_of(problems: list[dict]):
    """Pairs of the training pool: mined negatives first, then the first round's."""
    ordered = []
    for problem in problems:
        codes = problem["mined"] + [c for c in problem["codes"] if c not in problem["mined"]]
        verdicts = dict(zip(problem["codes"], problem["passed"], strict=True))
        ordered.append(problem | {"codes": codes, "passed": [verdicts[c] for c in codes]})
    return train_pairs(ordered)


def mine(
    scorer: RewardScorer, problems: list[dict], fresh: list[dict], rule: str, rate: float
) -> int:
    """Score the fresh candidates, add the mined negatives and the fresh passing
    ones to each problem's pool; returns how many negatives were mined."""
    prompts = {p["problem_id"]: p["prompt"] for p in problems}
    flat = [
        (f["problem_id"], code, ok)
        for f in fresh
        for code, ok in zip(f["codes"], f["passed"], strict=True)
    ]
    scores = scorer.score([prompts[pid] for pid, _, _ in flat], [code for _, code, _ in flat])
    scored = [
        ScoredCandidate(k, pid, ok, s)
        for k, ((pid, _, ok), s) in enumerate(zip(flat, scores, strict=True))
    ]
    policy = MiningPolicy(rule=rule, random_rate=rate)
    mined = {k for k, _ in mine_hard_negatives(scored, policy)}
    by_id = {p["problem_id"]: p for p in problems}
    for k, (pid, code, ok) in enumerate(flat):
        problem = by_id[pid]
        if ok or k in mined:
            problem["codes"] = problem["codes"] + [code]
            problem["passed"] = problem["passed"] + [ok]
            if not ok:
                problem["mined"] = problem["mined"] + [code]
    return len(mined)


def evaluate(
    name: str, problems: list[dict], held_out: list[dict], config: RewardConfig
) -> tuple[dict, Path]:
    pairs = pairs_of(problems)
    folder = Path(tempfile.mkdtemp(prefix=f"rr-ablation-{name}-"))
    started = time.perf_counter()
    train_reward_model(pairs, config, folder)
    train_s = time.perf_counter() - started
    metrics, _, picks = rerank(RewardScorer(folder), held_out)
    row = {"run": name, "pairs": len(pairs), "train_s": round(train_s), "load": load()}
    row |= {k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in metrics.items()}
    print(json.dumps(row), flush=True)
    return row | {"picks": picks}, folder


def copy_pool(problems: list[dict]) -> list[dict]:
    return [dict(p) for p in problems]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="bundled:smollm2")
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--n", type=int, default=8, help="first-round candidates per problem")
    parser.add_argument(
        "--fresh", type=int, default=8, help="fresh candidates per problem per round"
    )
    parser.add_argument("--option", default="default", choices=sorted(OPTIONS))
    parser.add_argument("--data", type=Path, help="reuse (or write) the first round's candidates")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    backbone = backbone_for(args)
    config = RewardConfig(backbone=backbone, eval_fraction=0.0, **OPTIONS[args.option])

    if args.data and args.data.exists():
        problems = json.loads(args.data.read_text())[: args.problems]
    else:
        problems = mutation_candidates(range(args.problems), args.n, seed=0)
        if args.data:
            args.data.write_text(json.dumps(problems))
    train = [p | {"mined": []} for p in problems if p["split"] == "train"]
    held_out = [p for p in problems if p["split"] == "eval" and p["codes"]]
    print(f"{len(train)} train problems, {len(held_out)} eval problems, load {load()}", flush=True)

    # 1. Iteration 1: the first round's candidates.
    rows = []
    row, first = evaluate("iteration1", train, held_out, config)
    rows.append(row)
    # 2. Iteration 2, twice from the same model: hard against random negatives.
    fresh = fresh_candidates(train, seed=1, n=args.fresh)
    failing = sum(len(f["codes"]) - sum(f["passed"]) for f in fresh)
    hard_pool, random_pool = copy_pool(train), copy_pool(train)
    scorer = RewardScorer(first)
    mined = mine(scorer, hard_pool, fresh, RULE_ABOVE_LOWEST_PASSING, 0.0)
    rate = mined / failing if failing else 0.0
    mined_random = mine(scorer, random_pool, fresh, RULE_RANDOM, rate)
    print(f"round 2: {failing} fresh failing, {mined} hard, {mined_random} random", flush=True)
    row, second = evaluate("iteration2-hard", hard_pool, held_out, config)
    rows.append(row | {"mined": mined})
    row, _ = evaluate("iteration2-random", random_pool, held_out, config)
    rows.append(row | {"mined": mined_random})
    # 3. Iteration 3 on the hard branch.
    fresh = fresh_candidates(hard_pool, seed=2, n=args.fresh)
    mined = mine(RewardScorer(second), hard_pool, fresh, RULE_ABOVE_LOWEST_PASSING, 0.0)
    print(f"round 3: {mined} hard", flush=True)
    row, _ = evaluate("iteration3-hard", hard_pool, held_out, config)
    rows.append(row | {"mined": mined})

    print(
        "\n| run | pairs | mined | train s | reranked pass@1 | gap closed | pairwise acc | ROC-AUC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['run']} | {row['pairs']} | {row.get('mined', '-')} | {row['train_s']} "
            f"| {fmt(row['reranked_pass1'])} | {fmt(row['gap_closed'])} "
            f"| {fmt(row['pairwise_accuracy'])} | {fmt(row['roc_auc'])} |"
        )
    # 4. The questions, each a paired change of reranked pass@1 over the same problems.
    first, hard, random_, third = rows
    questions = [
        ("hard_vs_random", "hard - random negatives, iteration 2", random_, hard),
        ("iteration2_vs_1", "iteration 2 (hard) - iteration 1", first, hard),
        ("iteration3_vs_2", "iteration 3 - iteration 2 (hard)", hard, third),
        ("iteration3_vs_1", "iteration 3 - iteration 1", first, third),
    ]
    print("\n| question (reranked pass@1, paired) | change | verdict |\n|---|---|---|")
    result = {}
    for key, name, before, after in questions:
        line, result[key] = paired_text(name, before["picks"], after["picks"])
        print(line)
    print(
        f"\nheld out: {rows[0]['problems']} problems; random pass@1 {fmt(rows[0]['generator_pass1'])}, "
        f"oracle {fmt(rows[0]['oracle_pass_n'])}"
    )
    for row in rows:
        key = row["run"].replace("-", "_")
        gap = row["gap_closed"] or {"value": float("nan")}
        result |= {
            f"{key}_gap_closed": gap["value"],
            f"{key}_reranked_pass1": row["reranked_pass1"]["value"],
        }
    print("RESULT " + " ".join(f"{key}={value:.4g}" for key, value in result.items()))


if __name__ == "__main__":
    main()
