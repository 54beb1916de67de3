"""The reward (reranking) model: a one-output sequence-classification head on a
causal LM backbone, trained with TRL's `RewardTrainer` (Bradley-Terry loss) on
pairs of a correct and an incorrect program for the same problem.

What the model reads is `reward_text(prompt, code)`: the candidate alone when it
already contains the prompt (completion-style problems store prompt +
completion), else the prompt, a blank line, then the candidate. Training and
scoring share one encoding (`_encode`), so a score means the same in both.
"""

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from models.settings import BUNDLED_MODEL
from pipelines.checkpoints import Checkpoints, save_args, step_of
from pipelines.loading import load_sequence_classifier, load_tokenizer
from pipelines.pairs import Pair

Progress = Callable[[float], None]  # called with the fraction of training done, 0..1
CONFIG_FILE = "reward_config.json"  # written beside the weights: config and metrics


METHODS = ("auto", "top", "lora", "full")
# Defaults that depend on the method: the cached top-layer path trains few weights
# from a fresh head, cheaply per epoch, so it takes a larger step and more passes.
DEFAULT_EPOCHS = {"top": 4.0, "lora": 1.0, "full": 1.0}
DEFAULT_LEARNING_RATE = {"top": 1e-4, "lora": 2e-4, "full": 2e-5}


@dataclass
class RewardConfig:
    """How to train a reward model (not TRL's `RewardConfig`, which this fills in)."""

    backbone: str = field(
        default=BUNDLED_MODEL,
        metadata={
            "help": "Model spec of the backbone: bundled:smollm2, a folder, a GGUF or an id."
        },
    )
    method: str = field(
        default="auto",
        metadata={
            "help": "'top': train the top `top_layers` decoder layers and the head on the "
            "frozen layers' activations, computed once per distinct program (fast on a CPU); "
            "'lora': LoRA adapters on every linear layer, merged into the saved model; "
            "'full': every weight; 'auto': 'full' on a GPU, 'top' without one."
        },
    )
    top_layers: int = field(
        default=2,
        metadata={"help": "'top': decoder layers trained below the head (0: the head alone)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the training pairs; None: 4 for 'top', else 1."},
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak AdamW learning rate; None: 1e-4 for 'top', 2e-4 'lora', 2e-5 'full'."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimisation step."})
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Tokens per program; longer ones keep their end (the code), so the "
            "prompt is cut first."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Compute in bfloat16 (autocast; weights stay float32); 'top' trains its "
            "layers in float32 and uses bf16 for the frozen pass and scoring. None: where the "
            "hardware has it natively: a GPU with bf16, a CPU with AMX or AVX512-BF16."
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
        if self.method not in METHODS:
            raise ValueError(f"unknown reward training method {self.method!r} (known: {METHODS})")
        if self.top_layers < 0:
            raise ValueError(f"top_layers must be at least 0, got {self.top_layers}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")

    def resolved(self) -> "RewardConfig":
        """A copy with every automatic choice made for this machine."""
        on_gpu = torch.cuda.is_available()
        method = self.method if self.method != "auto" else ("full" if on_gpu else "top")
        return replace(
            self,
            method=method,
            epochs=self.epochs or DEFAULT_EPOCHS[method],
            learning_rate=self.learning_rate or DEFAULT_LEARNING_RATE[method],
            bf16=native_bf16("cuda" if on_gpu else "cpu") if self.bf16 is None else self.bf16,
        )


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 natively (else autocast to it is slower)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


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
    code comes last in `reward_text`, so the prompt is cut first, and the
    completion, where candidates of one problem differ, is kept."""
    ids = tokenizer(reward_text(prompt, code))["input_ids"]
    return ids[-(max_length - 1) :] + [tokenizer.eos_token_id]


def _saved_config(spec: str) -> dict[str, Any]:
    path = Path(spec) / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _pad(
    sequences: Sequence[list[int]], pad_id: int, *, left: bool = False, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Model inputs for `sequences`, padded to the longest. Positions count real
    tokens only, so a left-padded sequence sees the same positions as an unpadded one."""
    width = max(len(ids) for ids in sequences)
    input_ids, mask = [], []
    for ids in sequences:
        padding = width - len(ids)
        input_ids.append([pad_id] * padding + ids if left else ids + [pad_id] * padding)
        ones, zeros = [1] * len(ids), [0] * padding
        mask.append(zeros + ones if left else ones + zeros)
    attention_mask = torch.tensor(mask, device=device)
    return {
        "input_ids": torch.tensor(input_ids, device=device),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }


def _pooled_position(ids: Sequence[int], pad_id: int) -> int:
    """The position the classification head reads: the last non-pad token, as
    transformers' *ForSequenceClassification picks it."""
    return max((i for i, token in enumerate(ids) if token != pad_id), default=0)


def _bf16_autocast(device: str, enabled: bool):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


# Candidates of one problem start with the same prompt tokens; a batch whose
# texts share at least this many leading tokens runs them once.
MIN_SHARED_PREFIX = 16


def _shared_prefix_batches(texts: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of indices into `texts`: sorted by token ids, so the candidates of
    one problem sit together, and cut where the shared prefix would fall short."""
    order = sorted(range(len(texts)), key=lambda i: texts[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size:
            first = texts[batches[-1][0]]
            if _common_prefix(first, texts[index]) >= MIN_SHARED_PREFIX:
                batches[-1].append(index)
                continue
        batches.append([index])
    return batches


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _inputs(
    texts: Sequence[list[int]],
    pad_id: int,
    device: str,
    states: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """`_pad`'s inputs, with the texts' given input states in place of their ids."""
    inputs = _pad(texts, pad_id, device=device)
    if states is not None:
        embeds = torch.nn.utils.rnn.pad_sequence(list(states), batch_first=True)
        inputs = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": embeds}
    return inputs


def _last_hidden_states(
    backbone: Any,
    texts: Sequence[list[int]],
    pad_id: int,
    device: str,
    states: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`backbone`'s output for `texts` (or for their input `states`), right-padded
    to the longest; the tokens all texts begin with run once, and the rest attends
    to their cached keys (gradients flow through both)."""
    from transformers import DynamicCache

    # At least two tokens stay per text, so each keeps its pooled token in the rest.
    shared = min(_common_prefix(texts[0], text) for text in texts)
    shared = min(shared, min(len(text) for text in texts) - 2)
    if len(texts) == 1 or shared < MIN_SHARED_PREFIX:
        return backbone(**_inputs(texts, pad_id, device, states)).last_hidden_state
    cache = DynamicCache(config=backbone.config)
    prefix_states = None if states is None else [states[0][:shared]]
    prefix = _inputs([texts[0][:shared]], pad_id, device, prefix_states)
    head = backbone(**prefix, cache=cache, use_cache=True).last_hidden_state
    cache.batch_repeat_interleave(len(texts))
    rest_states = None if states is None else [state[shared:] for state in states]
    rest = _inputs([text[shared:] for text in texts], pad_id, device, rest_states)
    rest["attention_mask"] = torch.cat(
        [torch.ones_like(rest["attention_mask"][:, :1]).expand(-1, shared), rest["attention_mask"]],
        1,
    )
    rest["position_ids"] = rest["position_ids"] + shared
    tail = backbone(**rest, cache=cache, use_cache=True).last_hidden_state
    return torch.cat([head.expand(len(texts), -1, -1), tail], 1)


class RewardScorer:
    """Scores candidates with a trained reward model (or a backbone with a fresh head)."""

    def __init__(
        self,
        path_or_spec: str | Path,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | None = None,
        bf16: bool | None = None,
    ) -> None:
        spec = str(path_or_spec)
        self.tokenizer, self.model = _load(spec)
        saved = _saved_config(spec).get("config", {})
        self.max_length = max_length or saved.get("max_length", RewardConfig.max_length)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Score in the precision the model trained in; a bare backbone takes the native one.
        if bf16 is None:
            bf16 = saved.get("bf16")
        self.bf16 = native_bf16(self.device) if bf16 is None else bf16
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], codes: Sequence[str]) -> list[float]:
        """One score per (prompt, code); higher means more likely correct."""
        if len(prompts) != len(codes):
            raise ValueError(f"{len(prompts)} prompts but {len(codes)} codes")
        # Each distinct text runs once, however often it is asked for.
        distinct: dict[tuple[int, ...], int] = {}
        slots = [
            distinct.setdefault(
                tuple(_encode(self.tokenizer, p, c, self.max_length)), len(distinct)
            )
            for p, c in zip(prompts, codes, strict=True)
        ]
        encoded = [list(ids) for ids in distinct]
        scores = [0.0] * len(encoded)
        pad_id = self.tokenizer.pad_token_id
        for batch in _shared_prefix_batches(encoded, self.batch_size):
            texts = [encoded[i] for i in batch]
            with _bf16_autocast(self.device, self.bf16):
                hidden = _last_hidden_states(self.model.base_model, texts, pad_id, self.device)
                rows = torch.arange(len(batch), device=self.device)
                pooled = hidden[rows, [_pooled_position(text, pad_id) for text in texts]]
                logits = self.model.score(pooled)[:, 0]
            for index, value in zip(batch, logits.float().tolist(), strict=True):
                scores[index] = value
        return [scores[slot] for slot in slots]


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
    checkpoints: Checkpoints | None = None,
) -> dict[str, Any]:
    """Train on `pairs` with the Bradley-Terry loss, write a loadable model (LoRA
    merged in) to `output_dir`, and return metrics measured on held-out problems.

    With `checkpoints`, the training saves its state on their schedule and resumes
    from the newest complete one: the same pairs and seed give the same model,
    interrupted or not."""
    if not pairs:
        raise ValueError("empty pair set: no problem has both a passing and a failing candidate")
    config = config.resolved()
    output_dir = Path(output_dir)
    train_pairs, eval_pairs = split_by_problem(pairs, config.eval_fraction, config.seed)

    output_dir.mkdir(parents=True, exist_ok=True)

    # 1. Backbone with a fresh one-output head; the seed fixes the head's initialisation.
    set_seed(config.seed)
    tokenizer, model = _load(config.backbone)

    # 2. Tokenize here rather than in TRL, so training and RewardScorer share `_encode`
    #    (TRL would also drop, not truncate, pairs longer than max_length).
    chosen = [_encode(tokenizer, p.prompt, p.chosen, config.max_length) for p in train_pairs]
    rejected = [_encode(tokenizer, p.prompt, p.rejected, config.max_length) for p in train_pairs]

    # 3. Train: the cached top-layer loop, or TRL's RewardTrainer for LoRA and full.
    started = time.perf_counter()
    if config.method == "top":
        problems = [pair.problem_id for pair in train_pairs]
        train_loss, resumed = _train_top_layers(
            model, tokenizer, chosen, rejected, problems, config, progress, checkpoints
        )
        trained = model
    else:
        train_loss, trained, resumed = _train_with_trl(
            model, tokenizer, chosen, rejected, config, output_dir, progress, checkpoints
        )
    train_seconds = time.perf_counter() - started

    # 4. Save one plain classifier whatever the method, so every version loads alike.
    trained.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    del trained, model  # free the training copy before the scorer loads its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # 5. Measure the saved model itself on the held-out problems.
    scorer = RewardScorer(output_dir, max_length=config.max_length, bf16=config.bf16)
    metrics = {
        **_held_out_metrics(scorer, eval_pairs),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_loss": train_loss,
        "train_seconds": train_seconds,
        "pairs_per_s": len(train_pairs) * config.epochs / train_seconds,
        "resumed_from_step": resumed,
    }
    saved = {"config": asdict(config), "metrics": metrics}
    (output_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
    return metrics


def _train_with_trl(
    model: Any,
    tokenizer: Any,
    chosen: list[list[int]],
    rejected: list[list[int]],
    config: RewardConfig,
    output_dir: Path,
    progress: Progress | None,
    checkpoints: Checkpoints | None,
) -> tuple[float, Any, int | None]:
    """LoRA or full fine-tuning with TRL's RewardTrainer; returns the loss, the
    plain classifier (adapters merged) and the step it resumed from, if any."""
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    # TRL's collator pads each batch to its longest pair (dynamic padding).
    dataset = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    on_gpu = torch.cuda.is_available()
    resume = checkpoints.latest() if checkpoints else None
    args = TrlRewardConfig(
        # The trainer writes nothing but checkpoints, and only with `checkpoints`.
        output_dir=str(checkpoints.folder if checkpoints else output_dir),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        dataloader_pin_memory=on_gpu,
        bf16=config.bf16,
        use_cpu=not on_gpu,
        **save_args(checkpoints),
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    callbacks = [_ReportProgress(progress)] if progress else []
    if checkpoints:
        callbacks.append(checkpoints.callback())
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(config) if config.method == "lora" else None,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trained = trainer.model.merge_and_unload() if config.method == "lora" else trainer.model
    return result.training_loss, trained, step_of(resume) if resume else None


# --- the cached top-layer path --------------------------------------------------------

TOP_STATE = "top_layers_state.pt"  # a checkpoint of the top-layer loop


@contextmanager
def _running_only(backbone: Any, layers: Sequence[Any], *, final_norm: bool) -> Iterator[None]:
    """Make `backbone`'s forward run `layers` alone (and its final norm or not).

    A KV cache finds a layer's entry by its `layer_idx`, and counts the cached
    tokens in entry 0, so the layers are numbered from 0 for the run."""
    all_layers, norm = backbone.layers, backbone.norm
    numbers = [layer.self_attn.layer_idx for layer in layers]
    backbone.layers = torch.nn.ModuleList(layers)
    for number, layer in enumerate(layers):
        layer.self_attn.layer_idx = number
    if not final_norm:
        backbone.norm = torch.nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = all_layers, norm
        for number, layer in zip(numbers, layers, strict=True):
            layer.self_attn.layer_idx = number


class FrozenPrefix:
    """The activations of a classifier's frozen layers (embeddings and all decoder
    layers below the top `trainable_layers`), computed once per distinct text,
    and the trainable top run on them.

    Pairs share programs (a problem's reference is the chosen side of many of its
    pairs), and epochs repeat them all, so each text's frozen forward runs once.
    """

    def __init__(
        self,
        model: Any,
        texts: Sequence[list[int]],
        trainable_layers: int,
        *,
        batch_size: int = 16,
        bf16: bool = False,
    ) -> None:
        backbone = model.base_model
        if not hasattr(backbone, "layers") or not hasattr(backbone, "norm"):
            raise ValueError(
                f"{type(model).__name__}: method 'top' needs a decoder with .layers and .norm "
                "(Llama-like); use 'lora' or 'full'"
            )
        depth = len(backbone.layers)
        if trainable_layers > depth:
            raise ValueError(f"top_layers is {trainable_layers} but the backbone has {depth}")
        self.model, self.bf16 = model, bf16
        self.top = list(backbone.layers)[depth - trainable_layers :]
        self.pad_id = model.config.pad_token_id
        self.device = next(model.parameters()).device
        self.texts = texts
        self.pooled = [_pooled_position(ids, self.pad_id) for ids in texts]
        self.states = self._frozen_states(
            list(backbone.layers)[: depth - trainable_layers], texts, batch_size
        )

    @torch.no_grad()
    def _frozen_states(self, bottom: list[Any], texts: Sequence[list[int]], batch_size: int):
        """Per text, its hidden states after the frozen layers, unpadded."""
        states: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        backbone, device = self.model.base_model, str(self.device)
        with _running_only(backbone, bottom, final_norm=False):
            for batch in _shared_prefix_batches(texts, batch_size):
                batch_texts = [texts[i] for i in batch]
                with _bf16_autocast(device, self.bf16):
                    hidden = _last_hidden_states(backbone, batch_texts, self.pad_id, device)
                for row, index in enumerate(batch):
                    states[index] = hidden[row, : len(texts[index])].clone()
        return states

    def scores(self, indices: Sequence[int]) -> torch.Tensor:
        """Scores of the texts at `indices`, through the trainable top (with gradients)."""
        texts = [self.texts[i] for i in indices]
        backbone, device = self.model.base_model, str(self.device)
        scores: list[torch.Tensor] = [torch.empty(0)] * len(indices)
        # Float32 even where the frozen pass ran in bf16: on a CPU, bf16 backward
        # passes of varying shapes ran slower than float32 ones (bench/reward.py).
        with _running_only(backbone, self.top, final_norm=True):
            for group in _shared_prefix_batches(texts, len(texts)):
                at = [indices[k] for k in group]
                hidden = _last_hidden_states(
                    backbone,
                    [texts[k] for k in group],
                    self.pad_id,
                    device,
                    states=[self.states[i].float() for i in at],
                )
                rows = torch.arange(len(group), device=self.device)
                pooled = hidden[rows, [self.pooled[i] for i in at]]
                for k, score in zip(group, self.model.score(pooled)[:, 0].float(), strict=True):
                    scores[k] = score
        return torch.stack(scores)


def _problem_batches(
    problems: Sequence[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """One epoch's batches of pair indices: pairs ordered by problem (problems and
    pairs shuffled), then cut, so a batch holds few problems: their programs
    share the prompt (it runs once) and the chosen side (scored once)."""
    by_problem: dict[int, list[int]] = defaultdict(list)
    for index, problem in enumerate(problems):
        by_problem[problem].append(index)
    groups = list(by_problem.values())
    rng.shuffle(groups)
    order = [index for group in groups for index in rng.sample(group, len(group))]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _train_top_layers(
    model: Any,
    tokenizer: Any,
    chosen: list[list[int]],
    rejected: list[list[int]],
    problems: list[int],
    config: RewardConfig,
    progress: Progress | None,
    checkpoints: Checkpoints | None = None,
) -> tuple[float, int | None]:
    """Train the top `config.top_layers` decoder layers, the final norm and the
    head with the Bradley-Terry loss, on cached frozen activations; returns the
    mean training loss and the step it resumed from, if any. The model is trained
    in place."""
    # 1. Distinct texts: every pair side becomes an index into them.
    distinct: dict[tuple[int, ...], int] = {}
    chosen_at = [distinct.setdefault(tuple(ids), len(distinct)) for ids in chosen]
    rejected_at = [distinct.setdefault(tuple(ids), len(distinct)) for ids in rejected]
    texts = [list(ids) for ids in distinct]

    # 2. Freeze all but the top; then run the frozen part once per text.
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.requires_grad_(False)
    prefix = FrozenPrefix(model, texts, config.top_layers, batch_size=16, bf16=config.bf16)
    trainable = [*prefix.top, model.base_model.norm, model.score]
    parameters = [p for module in trainable for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    model.train()

    # 3. Every step's batch, fixed by the seed before the first step, so a resumed
    #    run takes the same batches as an uninterrupted one. AdamW with a linear
    #    decay, as TRL's default schedule.
    rng = random.Random(config.seed)
    steps_per_epoch = len(_problem_batches(problems, config.batch_size, random.Random(0)))
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    plan: list[list[int]] = []
    while len(plan) < total_steps:
        plan += _problem_batches(problems, config.batch_size, rng)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    losses: list[float] = []

    # 4. Resume: the trained modules, the optimizer, the schedule and the losses so far.
    latest = checkpoints.latest() if checkpoints else None
    if latest is not None:
        state = torch.load(latest / TOP_STATE, weights_only=False)
        for module, saved in zip(trainable, state["modules"], strict=True):
            module.load_state_dict(saved)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        losses = state["losses"]
        torch.set_rng_state(state["torch_rng"])

    # 5. Bradley-Terry on batches of one problem's pairs.
    for batch in plan[len(losses) : total_steps]:
        sides = [chosen_at[i] for i in batch] + [rejected_at[i] for i in batch]
        unique = list(dict.fromkeys(sides))  # a text twice in a batch runs once
        scores = prefix.scores(unique)
        slot = {text: k for k, text in enumerate(unique)}
        margin = (
            scores[[slot[t] for t in sides[: len(batch)]]]
            - scores[[slot[t] for t in sides[len(batch) :]]]
        )
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if progress:
            progress(len(losses) / total_steps)
        if checkpoints and len(losses) < total_steps and checkpoints.due():
            state = {
                "modules": [module.state_dict() for module in trainable],
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "losses": losses,
                "torch_rng": torch.get_rng_state(),
            }
            checkpoints.save(len(losses), lambda to, state=state: torch.save(state, to / TOP_STATE))
    model.eval()
    return sum(losses) / len(losses), step_of(latest) if latest else None


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
