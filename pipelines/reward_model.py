"""The reward (reranking) model: a one-output sequence-classification head on a
causal LM backbone, trained with TRL's `RewardTrainer` (Bradley-Terry loss) on
pairs of a correct and an incorrect program for the same problem.

What the model reads is `reward_text(prompt, code)`: the candidate alone when it
already contains the prompt (completion-style problems store prompt +
completion), else the prompt, a blank line, then the candidate. Training and
scoring share one encoding (`_encode`), so a score means the same in both.
"""

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from models.settings import BUNDLED_MODEL
from pipelines.loading import load_sequence_classifier, load_tokenizer
from pipelines.pairs import Pair

Progress = Callable[[float], None]  # called with the fraction of training done, 0..1
CONFIG_FILE = "reward_config.json"  # written beside the weights: config and metrics


@dataclass
class RewardConfig:
    """How to train a reward model (not TRL's `RewardConfig`, which this fills in)."""

    backbone: str = field(
        default=BUNDLED_MODEL,
        metadata={
            "help": "Model spec of the backbone: bundled:smollm2, a folder, a GGUF or an id."
        },
    )
    lora: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters (merged into the saved model) instead of all weights."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak AdamW learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimisation step."})
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Tokens per program; longer ones keep their end, where candidates differ."
        },
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of problems (not pairs) held out for the metrics."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split, the head and the trainer."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less memory, ~20% slower."},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")


def reward_text(prompt: str, code: str) -> str:
    """The text the reward model scores for a candidate of a problem."""
    if not prompt.strip() or prompt.strip() in code:
        return code
    return f"{prompt.rstrip()}\n\n{code}"


# --- loading and scoring --------------------------------------------------------------


def _load(spec: str) -> tuple[Any, Any]:
    """Tokenizer and one-output classifier for `spec`, with the pad token set on both."""
    tokenizer = load_tokenizer(spec)
    model = load_sequence_classifier(spec)
    # The head reads the last non-pad token, so the model must know which id pads.
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _encode(tokenizer: Any, prompt: str, code: str, max_length: int) -> list[int]:
    """Token ids of one candidate ending in EOS. Truncation keeps the end: the
    completion, where candidates of one problem differ, comes last."""
    ids = tokenizer(reward_text(prompt, code))["input_ids"]
    return ids[-(max_length - 1) :] + [tokenizer.eos_token_id]


def _saved_config(spec: str) -> dict[str, Any]:
    path = Path(spec) / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class RewardScorer:
    """Scores candidates with a trained reward model (or a backbone with a fresh head)."""

    def __init__(
        self,
        path_or_spec: str | Path,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | None = None,
    ) -> None:
        spec = str(path_or_spec)
        self.tokenizer, self.model = _load(spec)
        saved = _saved_config(spec).get("config", {})
        self.max_length = max_length or saved.get("max_length", RewardConfig.max_length)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], codes: Sequence[str]) -> list[float]:
        """One score per (prompt, code); higher means more likely correct."""
        if len(prompts) != len(codes):
            raise ValueError(f"{len(prompts)} prompts but {len(codes)} codes")
        encoded = [
            _encode(self.tokenizer, p, c, self.max_length)
            for p, c in zip(prompts, codes, strict=True)
        ]
        # Batch similar lengths together so little compute goes to padding.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            logits = self.model(**self._pad([encoded[i] for i in batch])).logits[:, 0]
            for index, value in zip(batch, logits.float().tolist(), strict=True):
                scores[index] = value
        return scores

    def _pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad on the tokenizer's side; positions count real tokens only, so a
        left-padded sequence sees the same positions as an unpadded one."""
        width = max(len(ids) for ids in sequences)
        pad_id, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        input_ids, mask = [], []
        for ids in sequences:
            padding = width - len(ids)
            input_ids.append([pad_id] * padding + ids if left else ids + [pad_id] * padding)
            ones, zeros = [1] * len(ids), [0] * padding
            mask.append(zeros + ones if left else ones + zeros)
        attention_mask = torch.tensor(mask, device=self.device)
        return {
            "input_ids": torch.tensor(input_ids, device=self.device),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        }


# --- training -------------------------------------------------------------------------


def split_by_problem(
    pairs: Sequence[Pair], eval_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Train and held-out pairs, with no problem on both sides: held-out accuracy
    must measure problems the model has never seen."""
    problems = sorted({pair.problem_id for pair in pairs})
    random.Random(seed).shuffle(problems)
    held_out_count = min(round(len(problems) * eval_fraction), len(problems) - 1)
    if eval_fraction > 0 and len(problems) > 1:
        held_out_count = max(held_out_count, 1)
    held_out = set(problems[:held_out_count])
    train = [pair for pair in pairs if pair.problem_id not in held_out]
    return train, [pair for pair in pairs if pair.problem_id in held_out]


class _ReportProgress(TrainerCallback):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress(state.global_step / max(state.max_steps, 1))


def train_reward_model(
    pairs: Sequence[Pair],
    config: RewardConfig,
    output_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train on `pairs` with the Bradley-Terry loss, write a loadable model (LoRA
    merged in) to `output_dir`, and return metrics measured on held-out problems."""
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    if not pairs:
        raise ValueError("empty pair set: no problem has both a passing and a failing candidate")
    output_dir = Path(output_dir)
    train_pairs, eval_pairs = split_by_problem(pairs, config.eval_fraction, config.seed)

    # 1. Backbone with a fresh one-output head; the seed fixes the head's initialisation.
    set_seed(config.seed)
    tokenizer, model = _load(config.backbone)

    # 2. Tokenize here rather than in TRL, so training and RewardScorer share `_encode`
    #    (TRL would also drop, not truncate, pairs longer than max_length).
    dataset = Dataset.from_dict(
        {
            "chosen_ids": [
                _encode(tokenizer, p.prompt, p.chosen, config.max_length) for p in train_pairs
            ],
            "rejected_ids": [
                _encode(tokenizer, p.prompt, p.rejected, config.max_length) for p in train_pairs
            ],
        }
    )

    # 3. Train.
    on_gpu = torch.cuda.is_available()
    args = TrlRewardConfig(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        dataloader_pin_memory=on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),  # TRL defaults to bf16, slow on CPU
        save_strategy="no",  # the only save is the final model, below
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(config) if config.lora else None,
        callbacks=[_ReportProgress(progress)] if progress else None,
    )
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started

    # 4. Save one plain classifier whatever the method, so every version loads alike.
    trained = trainer.model.merge_and_unload() if config.lora else trainer.model
    trained.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    del trainer, trained, model  # free the training copy before the scorer loads its own
    if on_gpu:
        torch.cuda.empty_cache()

    # 5. Measure the saved model itself on the held-out problems.
    metrics = {
        **_held_out_metrics(RewardScorer(output_dir, max_length=config.max_length), eval_pairs),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_loss": result.training_loss,
        "train_seconds": train_seconds,
        "pairs_per_s": len(train_pairs) * config.epochs / train_seconds,
    }
    saved = {"config": asdict(config), "metrics": metrics}
    (output_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
    return metrics


def _lora_config(config: RewardConfig):
    from peft import LoraConfig

    # SEQ_CLS makes peft train the new score head in full alongside the adapters.
    return LoraConfig(
        task_type="SEQ_CLS",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
    )


def _held_out_metrics(scorer: RewardScorer, pairs: Sequence[Pair]) -> dict[str, float | None]:
    """Pairwise accuracy (chosen scored strictly above rejected) and best-of-N
    selection accuracy (the top-scored of a problem's known programs passes)."""
    if not pairs:
        return {"pairwise_accuracy": None, "best_of_n_accuracy": None}
    programs = {}  # (problem_id, code) -> (prompt, passed), each scored once
    for pair in pairs:
        programs[(pair.problem_id, pair.chosen)] = (pair.prompt, True)
        programs[(pair.problem_id, pair.rejected)] = (pair.prompt, False)
    keys = list(programs)
    scores = scorer.score([programs[key][0] for key in keys], [code for _, code in keys])
    score_of = dict(zip(keys, scores, strict=True))
    wins = [
        score_of[(p.problem_id, p.chosen)] > score_of[(p.problem_id, p.rejected)] for p in pairs
    ]
    best: dict[int, tuple[float, bool]] = {}
    for (problem_id, _), score, (_, passed) in zip(keys, scores, programs.values(), strict=True):
        if problem_id not in best or score > best[problem_id][0]:
            best[problem_id] = (score, passed)
    return {
        "pairwise_accuracy": sum(wins) / len(wins),
        "best_of_n_accuracy": sum(passed for _, passed in best.values()) / len(best),
    }
