"""Stage C: update the generator against the reward model, with PPO or GRPO.

PPO is the paper's choice. It trains a policy against a reward model with a value
model as critic and a frozen reference policy as KL anchor, using TRL's
`trl.experimental.ppo.PPOTrainer`; TRL 1.13 deleted it, hence the `trl<1.13` pin.
GRPO is TRL's maintained PPO-clip trainer: no value model, the baseline is the mean
reward of several completions of the same prompt, and the sandbox verdict can join
the reward model as a second reward.

The policy is trained on the prompts generation uses: each query is `prompt_ids` of
the problem in the same `prompt_style` (chat-wrapped for an instruct model), and each
rollout is judged as the program the store would keep for it (`continuation`: the code
taken from a chat reply, cut at the language's stop sequences), scored by the reward
model as the store scores candidates, under PPO and GRPO alike.
"""

import copy
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from models.enums import Language
from pipelines.checkpoints import Checkpoints, save_args, step_of
from pipelines.generation import (
    PROMPT_STYLES,
    PromptSpec,
    continuation,
    model_input,
    prompt_ids,
    reply_text,
    uses_chat,
)
from pipelines.loading import (
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from pipelines.reward_model import RewardScorer
from pipelines.sandbox import Job, run_batch

ALGOS = ("ppo", "grpo")


@dataclass
class PolicyConfig:
    """Hyperparameters of one policy update; stored with the new generator."""

    algo: Literal["ppo", "grpo"] = field(
        default="ppo",
        metadata={
            "help": "`ppo`: TRL's experimental PPOTrainer with a value model (the paper's method); "
            "`grpo`: TRL's GRPOTrainer, group-relative baseline, no value model."
        },
    )
    steps: int = field(
        default=16,
        metadata={"help": "Policy updates: PPO rollout batches, GRPO optimizer steps."},
    )
    learning_rate: float = field(
        default=1e-6, metadata={"help": "AdamW learning rate of the policy (and value model)."}
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "Prompts per update; GRPO samples `num_generations` completions of each, "
            "PPO one. Capped at the number of prompts."
        },
    )
    num_generations: int = field(
        default=4,
        metadata={"help": "GRPO: completions per prompt whose rewards are compared (at least 2)."},
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Most tokens sampled per completion."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature of the rollouts."}
    )
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "Weight of the KL penalty that keeps the policy near the generator it "
            "started from (PPO `kl_coef`, GRPO `beta`)."
        },
    )
    verdict_reward: bool = field(
        default=False,
        metadata={
            "help": "GRPO only: add the sandbox verdict (1.0 when the tests pass, else 0.0) as a "
            "second reward; needs every prompt's tests."
        },
    )
    prompt_style: str = field(
        default="auto",
        metadata={
            "help": "The generation's `prompt_style` (auto, chat or completion): the policy "
            "trains on the prompts the generator is fed."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of sampling, shuffling and initialisation."}
    )

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(
                f"unknown policy algo {self.algo!r}: expected one of {', '.join(ALGOS)}"
            )
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {self.prompt_style!r} (known: {PROMPT_STYLES})")
        if self.verdict_reward and self.algo != "grpo":
            raise ValueError("verdict_reward needs algo 'grpo': PPO takes a single reward model")
        if self.algo == "grpo" and self.num_generations < 2:
            raise ValueError(
                "GRPO compares completions: num_generations must be at least 2, "
                f"got {self.num_generations}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("steps, batch_size and max_new_tokens must be positive")


class ProgressCallback(TrainerCallback):
    """Reports the fraction of updates done after each one (stored on the TrainingRun row)."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self.report = report

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.report(state.global_step / state.max_steps)


class RewardModelScore:
    """GRPO reward: the reward model's score of each completion, computed exactly as the
    store scores candidates (`RewardScorer` on the problem's prompt and the program the
    generator would have stored), so the policy climbs the ranking that best-of-N uses."""

    __name__ = "reward_model"  # TRL names the logged metric `rewards/<__name__>/mean`

    def __init__(self, reward_model: str) -> None:
        self.scorer = RewardScorer(reward_model)

    def __call__(
        self,
        completions: list[str],
        problem_prompt: list[str],
        language: list[str],
        chat: list[bool],
        **_: object,
    ) -> list[float]:
        # GRPOTrainer passes the dataset's columns but `prompt` (the chat-wrapped
        # model input) per completion.
        columns = zip(problem_prompt, completions, language, chat, strict=True)
        return self.scorer.score(problem_prompt, [program(*row) for row in columns])


def sandbox_verdict(
    completions: list[str],
    problem_prompt: list[str],
    language: list[str],
    chat: list[bool],
    tests: list[str],
    **_: object,
) -> list[float]:
    """GRPO reward: 1.0 when the completed program passes its problem's tests, else 0.0."""
    jobs = [
        Job(language=lang, code=program(prompt, completion, lang, is_chat), tests=test)
        for prompt, completion, lang, is_chat, test in zip(
            problem_prompt, completions, language, chat, tests, strict=True
        )
    ]
    return [1.0 if result.verdict == "OK" else 0.0 for result in run_batch(jobs)]


def program(prompt: str, reply: str, language: str, chat: bool) -> str:
    """The candidate program a sampled reply makes, as generation stores it."""
    return prompt + continuation(reply, prompt, Language(language), chat)


class ProgramRewardModel(torch.nn.Module):
    """PPO's reward model: scores each rollout as the store would score the candidate
    generation keeps for it (reply decoded, `program`, `RewardScorer`), not by reading
    the rollout's raw tokens, which in chat style hold the template and the prose around
    the code. TRL's PPO calls a reward model as `score(<base_model_prefix>(...)
    .hidden_states[-1])` and reads one position per row: this one puts the score at every
    position."""

    base_model_prefix = "rollouts"

    def __init__(
        self,
        scorer: RewardScorer,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[PromptSpec],
        queries: list[list[int]],
        chat: bool,
    ) -> None:
        super().__init__()
        self.scorer, self.tokenizer, self.chat = scorer, tokenizer, chat
        # Longest first: a query that is a prefix of another must not claim its rows.
        self.queries = sorted(zip(queries, prompts, strict=True), key=lambda q: -len(q[0]))

    def rollouts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> SimpleNamespace:
        prompts, codes = [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            start = mask.index(1)  # the queries are left-padded
            end = mask.index(0, start) if 0 in mask[start:] else len(ids)
            query, prompt = next(q for q in self.queries if ids[start:][: len(q[0])] == q[0])
            reply, _ = reply_text(self.tokenizer, ids[start + len(query) : end])
            prompts.append(prompt.prompt)
            codes.append(program(prompt.prompt, reply, prompt.language, self.chat))
        scores = torch.tensor(self.scorer.score(prompts, codes), device=input_ids.device)
        return SimpleNamespace(hidden_states=[scores[:, None, None].expand(*input_ids.shape, 1)])

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def update_policy(
    *,
    generator: str,
    reward_model: str,
    prompts: Sequence[PromptSpec],
    config: PolicyConfig,
    output_dir: Path,
    progress: Callable[[float], None] | None = None,
    tests: Mapping[int, str] | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict:
    """Train `generator` (a model spec) against `reward_model` on `prompts`, write the
    new generator with its tokenizer to `output_dir`, and return training metrics.

    `tests` maps problem_id to the problem's test program; the verdict reward needs it.
    With `checkpoints`, GRPO saves on their schedule and resumes from the newest
    complete one. PPO restarts: TRL's experimental PPOTrainer cannot resume."""
    # 1. check the inputs before minutes of model loading
    if not prompts:
        raise ValueError("no prompts to train the policy on")
    if config.verdict_reward:
        tests = tests or {}
        missing = sorted({p.problem_id for p in prompts if tests.get(p.problem_id) is None})
        if missing:
            raise ValueError(
                f"verdict_reward needs the tests of every prompt; none for problems {missing[:10]}"
            )
    resolve_model(generator)  # raise ModelNotFoundError naming a missing spec now
    resolve_model(reward_model)
    tokenizer = load_tokenizer(generator)
    chat = uses_chat(config.prompt_style, tokenizer)  # as the generator decides it

    # 2. train
    started = time.perf_counter()
    if config.algo == "ppo":
        trainer = _ppo_trainer(
            generator, reward_model, tokenizer, prompts, config, output_dir, chat
        )
        checkpoints = None
    else:
        trainer = _grpo_trainer(
            generator, reward_model, tokenizer, prompts, config, output_dir, chat, tests,
            checkpoints,
        )  # fmt: skip
    if progress:
        trainer.add_callback(ProgressCallback(progress))
    resume = checkpoints.latest() if checkpoints else None
    if checkpoints:
        trainer.add_callback(checkpoints.callback())
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    else:
        trainer.train()
    seconds = time.perf_counter() - started

    # 3. save the policy alone (PPO's trainer drops the value model) with the config,
    # so the folder is a complete generator and says how it was made
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(output_dir)
    (output_dir / "policy_config.json").write_text(json.dumps(asdict(config), indent=2))
    return {
        **_metrics(trainer.state.log_history, config, prompts, seconds),
        "resumed_from_step": step_of(resume) if resume else None,
    }


def _ppo_trainer(
    generator: str,
    reward_model: str,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[PromptSpec],
    config: PolicyConfig,
    output_dir: Path,
    chat: bool,
) -> Trainer:
    # Imported only when chosen: importing trl.experimental warns that it is unstable.
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # PPO feeds the policy's token ids straight into the value model, a reward model copy.
    if load_tokenizer(reward_model).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"reward model {reward_model} has a different tokenizer from generator {generator}: "
            "PPO needs one shared tokenizer (use algo 'grpo', which re-tokenizes the text)"
        )
    batch_size = min(config.batch_size, len(prompts))  # the trainer drops incomplete batches
    args = PPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        local_rollout_forward_batch_size=batch_size,
        total_episodes=config.steps * batch_size,  # one rollout batch per step
        response_length=config.max_new_tokens,
        stop_token="eos",
        temperature=config.temperature,
        kl_coef=config.kl_coef,
        learning_rate=config.learning_rate,
        seed=config.seed,
        num_sample_generations=0,  # its debug tables need an eval set we do not have
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=_bf16_available(),
    )
    queries = [prompt_ids(p, chat, tokenizer) for p in prompts]
    processing = _padding_outside(tokenizer, queries)
    # Left padding: the trainer appends each response right after its query.
    processing.padding_side = "left"
    scorer = RewardScorer(reward_model)
    return PPOTrainer(
        args=args,
        processing_class=processing,
        model=load_causal_lm(generator),
        ref_model=None,  # the trainer takes a frozen deep copy of the policy
        reward_model=ProgramRewardModel(scorer, processing, prompts, queries, chat),
        # The critic starts as a copy of the reward model, as in TRL's PPO examples: it
        # already reads code quality, so its value estimates are useful from the first batch.
        value_model=copy.deepcopy(scorer.model),
        train_dataset=Dataset.from_dict({"input_ids": queries}),
    )


def _padding_outside(
    tokenizer: PreTrainedTokenizerBase, queries: list[list[int]]
) -> PreTrainedTokenizerBase:
    """`tokenizer`, or a copy whose pad token occurs in no query. TRL's PPO takes every
    pad id for padding (mask = ids != pad); a chat query holds the pad token where that
    is the turn end (SmolLM2 pads with <|im_end|>), and the policy would not see it."""
    used = {token for query in queries for token in query}
    if tokenizer.pad_token_id not in used:
        return tokenizer
    free = [i for i in tokenizer.all_special_ids if i not in used and i != tokenizer.eos_token_id]
    if not free:
        raise ValueError(
            "PPO needs a pad token that no prompt contains, and every special token of "
            "this tokenizer occurs in one (use algo 'grpo')"
        )
    processing = copy.deepcopy(tokenizer)
    processing.pad_token = processing.convert_ids_to_tokens(free[0])
    return processing


def _grpo_trainer(
    generator: str,
    reward_model: str,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[PromptSpec],
    config: PolicyConfig,
    output_dir: Path,
    chat: bool,
    tests: Mapping[int, str] | None,
    checkpoints: Checkpoints | None,
) -> Trainer:
    batch_size = min(config.batch_size, len(prompts))  # the trainer drops incomplete batches
    args = GRPOConfig(
        output_dir=str(checkpoints.folder if checkpoints else output_dir),
        max_steps=config.steps,
        # GRPO's batch counts completions: num_generations per prompt
        per_device_train_batch_size=batch_size * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        beta=config.kl_coef,
        learning_rate=config.learning_rate,
        seed=config.seed,
        logging_steps=1,
        **save_args(checkpoints),
        report_to="none",
        bf16=_bf16_available(),
    )
    texts = [model_input(p, chat, tokenizer) for p in prompts]
    # GRPOTrainer tokenizes a text prompt itself, with the tokenizer's special tokens.
    for p, text in zip(prompts, texts, strict=True):
        if tokenizer(text)["input_ids"] != prompt_ids(p, chat, tokenizer):
            raise ValueError(
                f"problem {p.problem_id}: GRPO would add special tokens to the prompt that "
                "generation does not feed the model (use algo 'ppo')"
            )
    # GRPOTrainer hands every column but `prompt` to the reward functions.
    columns = {
        "prompt": texts,
        "problem_prompt": [p.prompt for p in prompts],
        "language": [p.language for p in prompts],
        "chat": [chat] * len(prompts),
    }
    reward_funcs: list[Callable[..., list[float]]] = [RewardModelScore(reward_model)]
    if config.verdict_reward:
        columns["tests"] = [tests[p.problem_id] for p in prompts]
        reward_funcs.append(sandbox_verdict)
    tokenizer.padding_side = "left"  # generation continues each prompt from its right edge
    source = resolve_model(generator)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=".policy-") as scratch:
        if source.gguf_file:
            # The trainer loads the policy and its reference copy from a folder or id by
            # their config, which a GGUF lacks: dequantize it into a folder first.
            load_causal_lm(generator).save_pretrained(scratch)
        return GRPOTrainer(
            model=scratch if source.gguf_file else source.location,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_dict(columns),
            processing_class=tokenizer,
        )


def _bf16_available() -> bool:
    # bf16 mixed precision on GPUs that support it; fp32 on CPU and older GPUs.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _metrics(
    log_history: list[dict], config: PolicyConfig, prompts: Sequence[PromptSpec], seconds: float
) -> dict:
    """The reward model's mean score on the first and last update's rollouts, and the
    KL to the starting generator at the end: the numbers that say whether it helped."""
    reward_key = "objective/scores" if config.algo == "ppo" else "rewards/reward_model/mean"
    kl_key = "objective/kl" if config.algo == "ppo" else "kl"
    steps = [entry for entry in log_history if reward_key in entry]
    metrics = {
        "algo": config.algo,
        "steps": len(steps),
        "prompts": len(prompts),
        "train_seconds": round(seconds, 3),
        "reward_first": steps[0][reward_key],
        "reward_last": steps[-1][reward_key],
        "kl_last": steps[-1].get(kl_key),  # GRPO logs no KL when kl_coef is 0
    }
    if config.verdict_reward:
        metrics["pass_rate_last"] = steps[-1]["rewards/sandbox_verdict/mean"]
    return metrics
