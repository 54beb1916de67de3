"""Stage C: one real PPO and GRPO step on a 2-layer Llama, and registration."""

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from app.settings import BUNDLED_MODEL
from models import ModelVersion
from models.enums import ModelKind
from pipelines.generation import PromptSpec
from pipelines.loading import (
    ModelNotFoundError,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from pipelines.policy import PolicyConfig, sandbox_verdict, train_and_register_policy, update_policy
from tests.factories import make_model_version

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
    # Real sandbox: a completion that finishes the function passes, a wrong one fails.
    rewards = sandbox_verdict(
        prompts=["def add(a, b):\n", "def add(a, b):\n"],
        completions=["    return a + b\n", "    return a - b\n"],
        language=["python", "python"],
        tests=["assert add(1, 2) == 3\n", "assert add(1, 2) == 3\n"],
    )
    assert rewards == [1.0, 0.0]


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
    output = tmp_path / "policy"
    update_policy(
        generator=BUNDLED_MODEL,
        reward_model=BUNDLED_MODEL,  # a fresh head on the same GGUF backbone
        prompts=PROMPTS,
        config=PolicyConfig(algo="grpo", **{**TINY, "learning_rate": 1e-4}),
        output_dir=output,
    )

    # A plain checkpoint, which loads and trains like any saved folder.
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in changed_parameters(BUNDLED_MODEL, output)
