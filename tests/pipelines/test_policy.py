"""Stage C: one real PPO and GRPO step on a 2-layer Llama, and registration."""

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from models import ModelVersion
from models.enums import ModelKind
from models.settings import BUNDLED_MODEL
from pipelines.generation import (
    GenerationConfig,
    PromptSpec,
    TransformersGenerator,
    prompt_ids,
    uses_chat,
)
from pipelines.loading import (
    ModelNotFoundError,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from pipelines.policy import (
    PolicyConfig,
    ProgramRewardModel,
    _grpo_trainer,
    _padding_outside,
    _ppo_trainer,
    sandbox_verdict,
    update_policy,
)
from pipelines.reward_model import RewardScorer
from tests.factories import make_model_version
from workers.training import train_and_register_policy

PROMPTS = [
    PromptSpec(problem_id=1, language="python", prompt="def add(a, b):\n"),
    PromptSpec(problem_id=2, language="python", prompt="def sub(a, b):\n    return"),
]
# A large learning rate so that one step on a tiny model moves every parameter visibly.
TINY = {
    "steps": 1,
    "batch_size": 2,
    "num_generations": 2,
    "max_new_tokens": 8,
    "learning_rate": 1e-3,
}


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A reward model on the tiny policy's backbone: same tokenizer, fresh one-output head."""
    folder = tmp_path_factory.mktemp("reward")
    load_sequence_classifier(str(tiny_model_dir)).save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that has no chat template, as a base model's."""
    folder = tmp_path_factory.mktemp("plain")
    load_causal_lm(str(tiny_model_dir)).save_pretrained(folder)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def changed_parameters(before: Path | str, after: Path) -> list[str]:
    old = load_causal_lm(str(before)).state_dict()
    new = load_causal_lm(str(after)).state_dict()
    return [name for name, tensor in old.items() if not torch.equal(tensor, new[name])]


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_one_step_changes_the_policy(algo, tiny_model_dir, tiny_reward_dir, tmp_path):
    output = tmp_path / "policy"
    fractions: list[float] = []

    metrics = update_policy(
        generator=str(tiny_model_dir),
        reward_model=str(tiny_reward_dir),
        prompts=PROMPTS,
        config=PolicyConfig(algo=algo, **TINY),
        output_dir=output,
        progress=fractions.append,
    )

    changed = changed_parameters(tiny_model_dir, output)
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.layers.1.mlp.down_proj.weight" in changed
    assert metrics["algo"] == algo and metrics["steps"] == 1 and metrics["prompts"] == 2
    assert isinstance(metrics["reward_last"], float)
    assert fractions == [1.0]
    # The folder is a complete generator: weights, tokenizer and the config that made it.
    assert (output / "tokenizer.json").is_file() and (output / "policy_config.json").is_file()
    # PPO saves the policy only, not the value head it trained alongside.
    assert not any("score" in name for name in load_causal_lm(str(output)).state_dict())


def test_verdict_reward_runs_each_completion_against_its_own_problem(tmp_path):
    # Real sandbox: a completion that finishes the function passes, a wrong one fails;
    # a chat reply is judged by the function in its fenced block, as generation stores it.
    rewards = sandbox_verdict(
        prompts=["<chat-wrapped model input, not judged>"] * 3,
        completions=[
            "    return a + b\n",
            "    return a - b\n",
            "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds.",
        ],
        problem_prompt=["def add(a, b):\n"] * 3,
        language=["python"] * 3,
        chat=[False, False, True],
        tests=["assert add(1, 2) == 3\n"] * 3,
    )
    assert rewards == [1.0, 0.0, 1.0]


def generator_input_ids(model_dir: Path, style: str, prompts: list[PromptSpec]) -> list[list[int]]:
    """The token ids the transformers generator feeds the model, one prompt at a time."""
    config = GenerationConfig(model=str(model_dir), prompt_style=style, max_new_tokens=1)
    generator = TransformersGenerator(config)
    fed, generate = [], generator.model.generate

    def recording(**kwargs):
        fed.append(kwargs["input_ids"][0].tolist())  # one unpadded row per call
        return generate(**kwargs)

    generator.model.generate = recording
    for prompt in prompts:
        generator.generate([prompt], 1)
    return fed


@pytest.mark.parametrize(
    ("model", "style", "chat"),
    [
        ("tiny_model_dir", "auto", True),  # the bundled tokenizer has a chat template
        ("tiny_model_dir", "completion", False),
        ("plain_model_dir", "auto", False),  # no template: auto means completion
    ],
)
def test_the_policy_trains_on_the_tokens_generation_feeds(
    model, style, chat, request, tiny_reward_dir, tmp_path
):
    model_dir: Path = request.getfixturevalue(model)
    fed = generator_input_ids(model_dir, style, PROMPTS)
    tokenizer = load_tokenizer(str(model_dir))
    assert uses_chat(style, tokenizer) == chat  # as update_policy resolves the style
    assert any(tokenizer.convert_tokens_to_ids("<|im_start|>") in ids for ids in fed) == chat
    ppo_args = (str(model_dir), str(tiny_reward_dir), tokenizer, PROMPTS)

    ppo = _ppo_trainer(*ppo_args, PolicyConfig(prompt_style=style, **TINY), tmp_path, chat)
    grpo_config = PolicyConfig(algo="grpo", prompt_style=style, **TINY)
    grpo = _grpo_trainer(*ppo_args, grpo_config, tmp_path / "grpo", chat, None, None)

    assert list(ppo.train_dataset["input_ids"]) == fed
    # TRL's PPO masks every pad id: no query token may be one.
    assert not any(ppo.processing_class.pad_token_id in ids for ids in fed)
    # GRPOTrainer tokenizes its text prompts itself; this is its own tokenization.
    assert grpo._tokenize_prompts(list(grpo.train_dataset["prompt"]))[0] == fed


def test_ppo_scores_a_rollout_as_the_store_scores_its_candidate(tiny_model_dir, tiny_reward_dir):
    from trl.experimental.utils import get_reward  # how PPOTrainer reads its reward model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    queries = [prompt_ids(prompt, True, tokenizer) for prompt in PROMPTS]
    tokenizer = _padding_outside(tokenizer, queries)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    scorer = RewardScorer(str(tiny_reward_dir))
    reward = ProgramRewardModel(scorer, tokenizer, PROMPTS, queries, chat=True)
    replies = ["Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds.", " a - b"]
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"] + [eos] for r in replies]
    # As the trainer lays out a batch: queries left-padded, responses right-padded.
    width = max(len(query) for query in queries)
    length = max(len(response) for response in responses) + 2
    rows = [
        [pad] * (width - len(query)) + query + response + [pad] * (length - len(response))
        for query, response in zip(queries, responses, strict=True)
    ]

    _, scores, _ = get_reward(reward, torch.tensor(rows), pad, width)

    # What generation stores for those replies, scored as the store scores candidates.
    codes = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b"]
    expected = scorer.score([p.prompt for p in PROMPTS], codes)
    assert scores.tolist() == pytest.approx(expected)


def test_grpo_step_with_the_verdict_reward(tiny_model_dir, tiny_reward_dir, tmp_path):
    # Problem 1 passes whatever the random model writes: its completion lands inside a
    # raw string literal that the tests close. Problem 2's tests always fail. With the
    # tests mapped to the right prompts, half of the completions pass.
    prompts = [
        PromptSpec(problem_id=1, language="python", prompt='text = r"""'),
        PromptSpec(problem_id=2, language="python", prompt="def sub(a, b):\n"),
    ]
    tests = {1: '"""\nassert isinstance(text, str)\n', 2: "assert False\n"}
    output = tmp_path / "policy"

    metrics = update_policy(
        generator=str(tiny_model_dir),
        reward_model=str(tiny_reward_dir),
        prompts=prompts,
        config=PolicyConfig(algo="grpo", verdict_reward=True, **TINY),
        output_dir=output,
        tests=tests,
    )

    assert metrics["pass_rate_last"] == 0.5
    assert "model.layers.0.mlp.up_proj.weight" in changed_parameters(tiny_model_dir, output)


def test_bad_input_is_named(tiny_model_dir, tiny_reward_dir, tmp_path):
    common = {"prompts": PROMPTS, "output_dir": tmp_path / "out", "config": PolicyConfig(**TINY)}
    with pytest.raises(ModelNotFoundError, match="/no/such/generator"):
        update_policy(generator="/no/such/generator", reward_model=str(tiny_reward_dir), **common)
    with pytest.raises(ModelNotFoundError, match="/no/such/reward"):
        update_policy(generator=str(tiny_model_dir), reward_model="/no/such/reward", **common)
    with pytest.raises(ValueError, match="no prompts"):
        update_policy(
            generator=str(tiny_model_dir),
            reward_model=str(tiny_reward_dir),
            **{**common, "prompts": []},
        )
    with pytest.raises(ValueError, match="unknown policy algo 'dpo'"):
        PolicyConfig(algo="dpo")
    with pytest.raises(ValueError, match="verdict_reward needs algo 'grpo'"):
        PolicyConfig(algo="ppo", verdict_reward=True)
    with pytest.raises(ValueError, match=r"none for problems \[2\]"):
        update_policy(
            generator=str(tiny_model_dir),
            reward_model=str(tiny_reward_dir),
            **{**common, "config": PolicyConfig(algo="grpo", verdict_reward=True, **TINY)},
            tests={1: "assert True\n", 2: None},  # a stdin/stdout problem has no test program
        )
    assert not (tmp_path / "out").exists()


def test_ppo_refuses_a_reward_model_with_another_tokenizer(tiny_model_dir, tmp_path):
    # PPO hands the policy's token ids to the reward model, so the vocabularies must match.
    reward_dir = tmp_path / "reward"
    load_sequence_classifier(str(tiny_model_dir)).save_pretrained(reward_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.add_tokens(["<only-in-the-reward-vocab>"])
    tokenizer.save_pretrained(reward_dir)

    with pytest.raises(ValueError, match=r"different tokenizer .* \(use algo 'grpo'"):
        update_policy(
            generator=str(tiny_model_dir),
            reward_model=str(reward_dir),
            prompts=PROMPTS,
            config=PolicyConfig(**TINY),
            output_dir=tmp_path / "out",
        )


def _versions(session, tiny_model_dir: Path, reward_path: str) -> tuple[ModelVersion, ModelVersion]:
    generator = make_model_version(session, kind=ModelKind.GENERATOR, name="gen-0")
    generator.path = str(tiny_model_dir)
    reward = make_model_version(session, kind=ModelKind.REWARD, name="rm-0")
    reward.path = reward_path
    session.flush()
    return generator, reward


def test_train_and_register_policy_registers_a_loadable_generator(
    session, tiny_model_dir, tiny_reward_dir, tmp_path
):
    generator, reward = _versions(session, tiny_model_dir, str(tiny_reward_dir))
    fractions: list[float] = []

    version = train_and_register_policy(
        session,
        generator_version=generator,
        reward_version=reward,
        prompts=PROMPTS,
        # GRPO: a few times faster than PPO here, and registration is the same for both
        config=PolicyConfig(algo="grpo", **TINY),
        data_dir=tmp_path,
        iteration_id=7,
        progress=fractions.append,
    )

    stored = session.get(ModelVersion, version.id)
    assert stored.kind == ModelKind.GENERATOR and stored.parent_id == generator.id
    assert stored.base_model == generator.base_model
    assert stored.metrics["reward_version_id"] == reward.id
    assert stored.metrics["iteration_id"] == 7
    assert stored.metrics["config"]["algo"] == "grpo"
    assert fractions == [1.0]
    assert load_causal_lm(stored.path).config.num_hidden_layers == 2
    # Only the registered folder is left: the staging folder was renamed into place.
    assert [p.name for p in (tmp_path / "models" / "generators").iterdir()] == [stored.name]


def test_a_failed_update_registers_nothing_and_leaves_no_folder(session, tiny_model_dir, tmp_path):
    generator, reward = _versions(session, tiny_model_dir, str(tmp_path / "missing-reward"))
    count = (
        select(func.count())
        .select_from(ModelVersion)
        .where(ModelVersion.kind == ModelKind.GENERATOR)
    )
    generators_before = session.scalar(count)

    with pytest.raises(ModelNotFoundError, match="missing-reward"):
        train_and_register_policy(
            session,
            generator_version=generator,
            reward_version=reward,
            prompts=PROMPTS,
            config=PolicyConfig(**TINY),
            data_dir=tmp_path,
        )

    assert session.scalar(count) == generators_before
    folder = tmp_path / "models" / "generators"
    assert not folder.exists() or not any(folder.iterdir())


@pytest.mark.slow
def test_grpo_step_on_the_bundled_gguf_generator(tmp_path):
    # The project's default generator is a GGUF: transformers loads it with its quantizer
    # attached, which must be detached for the policy to train, and GRPO must build its
    # reference copy without reading the GGUF itself. ~2 CPU-minutes on 2 cores.
    # Completion style: in 8 tokens its chat replies are all the same preamble, whose
    # rewards do not differ, and GRPO learns nothing from a group of equal rewards.
    output = tmp_path / "policy"
    config = PolicyConfig(algo="grpo", prompt_style="completion", **{**TINY, "learning_rate": 1e-4})
    update_policy(
        generator=BUNDLED_MODEL,
        reward_model=BUNDLED_MODEL,  # a fresh head on the same GGUF backbone
        prompts=PROMPTS,
        config=config,
        output_dir=output,
    )

    # A plain checkpoint, which loads and trains like any saved folder.
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in changed_parameters(BUNDLED_MODEL, output)
