import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from models import HardNegativeLabel, ModelVersion
from models.enums import Origin, Verdict
from pipelines.loading import ModelNotFoundError
from pipelines.pairs import Pair, build_pairs
from pipelines.reward_model import (
    CONFIG_FILE,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    FrozenPrefix,
    RewardConfig,
    RewardScorer,
    _encode,
    _last_hidden_states,
    _load,
    _pad,
    _shared_prefix_batches,
    reward_text,
    split_by_problem,
    train_reward_model,
)
from tests.factories import make_candidate, make_model_version, make_problem
from workers.training import train_and_register_reward_model


def separable_pairs(problems: int = 40) -> list[Pair]:
    """Correct programs return a value, incorrect ones raise: one token apart in
    kind, so a tiny model learns it in a few steps and must generalise to
    held-out problems it never saw."""
    pairs = []
    for i in range(problems):
        prompt = f"def f{i}(x):\n"
        pairs.append(
            Pair(i, prompt, f"{prompt}    return x + {i}\n", f"{prompt}    raise ValueError({i})\n")
        )
    return pairs


def tiny_config(tiny_model_dir: Path, **overrides) -> RewardConfig:
    settings = dict(
        backbone=str(tiny_model_dir),
        epochs=1,
        learning_rate=3e-3,
        batch_size=8,
        max_length=64,
        eval_fraction=0.25,
        bf16=False,  # exact float32 sums, so padding and caching compare to 1e-4
    )
    return RewardConfig(**{**settings, **overrides})


def changed_backbone_tensors(before: Path, after: Path) -> list[str]:
    """Names of backbone tensors (the score head excluded) whose values differ."""
    old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    return [
        name.removeprefix("model.")
        for name, tensor in new.items()
        if name.startswith("model.") and not torch.equal(tensor, old[name])
    ]


@pytest.fixture(scope="module")
def trained_model(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, dict, list[float]]:
    """One full fine-tuning run, shared by the tests that only read its result."""
    output = tmp_path_factory.mktemp("reward") / "model"
    fractions: list[float] = []
    metrics = train_reward_model(
        separable_pairs(),
        tiny_config(tiny_model_dir, method="full"),
        output,
        progress=fractions.append,
    )
    return output, metrics, fractions


def test_full_fine_tuning_learns_separable_pairs(trained_model, tiny_model_dir):
    output, metrics, fractions = trained_model
    assert metrics["pairwise_accuracy"] >= 0.9
    assert metrics["best_of_n_accuracy"] >= 0.9
    assert (metrics["train_pairs"], metrics["eval_pairs"]) == (30, 10)  # 25% of 40 problems
    assert metrics["train_loss"] < math.log(2)  # below the loss of scoring every pair equal
    assert metrics["pairs_per_s"] > 0
    assert changed_backbone_tensors(tiny_model_dir, output)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    saved = json.loads((output / CONFIG_FILE).read_text())
    assert saved["config"]["max_length"] == 64 and saved["metrics"] == metrics


def test_lora_trains_and_saves_a_plain_classifier(tiny_model_dir, tmp_path):
    output = tmp_path / "lora"
    config = tiny_config(tiny_model_dir, method="lora", lora_r=8)

    metrics = train_reward_model(separable_pairs(), config, output)

    assert metrics["pairwise_accuracy"] >= 0.9
    assert not (output / "adapter_config.json").exists()  # adapters merged in
    changed = changed_backbone_tensors(tiny_model_dir, output)
    assert changed and all("proj" in name for name in changed)  # only LoRA targets moved
    assert len(RewardScorer(output).score(["p"], ["return 1"])) == 1


def test_top_layers_train_the_top_alone(tiny_model_dir, tmp_path):
    output = tmp_path / "top"
    fractions: list[float] = []
    config = tiny_config(tiny_model_dir, method="top", top_layers=1, epochs=3)

    metrics = train_reward_model(separable_pairs(), config, output, progress=fractions.append)

    assert metrics["pairwise_accuracy"] >= 0.9 and metrics["train_loss"] < math.log(2)
    changed = changed_backbone_tensors(tiny_model_dir, output)
    # The top decoder layer and the final norm move; the bottom layer and embeddings do not.
    assert any(name.startswith("layers.1.") for name in changed)
    assert not [name for name in changed if not name.startswith(("layers.1.", "norm."))]
    assert fractions[-1] == pytest.approx(1.0) and len(fractions) == 12  # 3 epochs x 4 steps
    saved = json.loads((output / CONFIG_FILE).read_text())["config"]
    assert (saved["method"], saved["top_layers"], saved["epochs"]) == ("top", 1, 3)


@pytest.mark.parametrize("trainable_layers", [0, 1, 2])
def test_frozen_prefix_scores_as_the_whole_model_does(tiny_model_dir, trainable_layers):
    """The cache is an optimisation only: the top run on cached activations gives
    the scores and the gradients of the whole model run on the tokens, for texts
    that share a long prompt (run once) and texts that do not."""
    tokenizer, model = _load(str(tiny_model_dir))
    prompt = 'def f(x):\n    """Return x plus one, or raise on a negative x."""\n' * 2
    codes = ["    return x\n", "    raise ValueError(x)  # longer than the others\n", "1"]
    texts = [_encode(tokenizer, prompt, code, 64) for code in codes]
    texts.append(_encode(tokenizer, "def g(y):\n", "    return y\n", 64))
    order = [2, 0, 3, 1]
    model.requires_grad_(False)
    top = model.base_model.layers[2 - trainable_layers :]

    def loss_and_grads(scores):
        loss = -torch.nn.functional.logsigmoid(scores[1] - scores[3])  # text 0 over text 1
        loss.backward()
        grads = [p.grad.clone() for p in model.score.parameters()]
        grads += [p.grad.clone() for layer in top for p in layer.parameters()]
        model.zero_grad()
        return loss.item(), grads

    prefix = FrozenPrefix(model, texts, trainable_layers, batch_size=2)
    for parameter in [*model.score.parameters(), *top.parameters()]:
        parameter.requires_grad_(True)
    whole = model(**_pad([texts[i] for i in order], tokenizer.pad_token_id)).logits[:, 0]
    cached = prefix.scores(order)

    assert cached.tolist() == pytest.approx(whole.tolist(), abs=1e-5)
    assert len(prefix.top) == trainable_layers
    (whole_loss, whole_grads), (cached_loss, cached_grads) = map(loss_and_grads, (whole, cached))
    assert cached_loss == pytest.approx(whole_loss, abs=1e-5)
    for expected, got in zip(whole_grads, cached_grads, strict=True):
        assert torch.allclose(got, expected, atol=1e-5)


def test_shared_prompt_runs_once_and_changes_nothing(tiny_model_dir):
    """Candidates of one problem share the prompt's tokens: batched together, the
    prefix runs once and the rest attends to its cached keys, with the same result."""
    tokenizer, model = _load(str(tiny_model_dir))
    prompt = 'def f(x):\n    """Return x plus one, or raise on a negative x."""\n' * 2
    first = [_encode(tokenizer, prompt, prompt + f"    return x + {k}\n", 64) for k in range(3)]
    other = _encode(tokenizer, "def g(y):\n", "def g(y):\n    return y\n", 64)
    texts = [first[0], other, first[1], first[2]]

    batches = _shared_prefix_batches(texts, batch_size=8)
    assert sorted(map(sorted, batches)) == [[0, 2, 3], [1]]
    with torch.no_grad():
        shared = _last_hidden_states(model.base_model, first, tokenizer.pad_token_id, "cpu")
        plain = model.base_model(**_pad(first, tokenizer.pad_token_id)).last_hidden_state
    for row, ids in enumerate(first):
        assert torch.allclose(shared[row, : len(ids)], plain[row, : len(ids)], atol=1e-5)


def test_top_layers_beyond_the_backbone_are_refused(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, method="top", top_layers=3)
    with pytest.raises(ValueError, match="top_layers is 3 but the backbone has 2"):
        train_reward_model(separable_pairs(4), config, tmp_path / "out")


def test_config_defaults_depend_on_the_method_and_the_machine():
    resolved = RewardConfig().resolved()
    assert resolved.method == ("full" if torch.cuda.is_available() else "top")
    assert resolved.epochs == DEFAULT_EPOCHS[resolved.method]
    assert resolved.learning_rate == DEFAULT_LEARNING_RATE[resolved.method]
    assert isinstance(resolved.bf16, bool)
    explicit = RewardConfig(method="lora", epochs=2, learning_rate=1e-3, bf16=False).resolved()
    assert (explicit.method, explicit.epochs, explicit.learning_rate, explicit.bf16) == (
        "lora",
        2,
        1e-3,
        False,
    )
    with pytest.raises(ValueError, match="unknown reward training method 'adapter'"):
        RewardConfig(method="adapter")
    with pytest.raises(ValueError, match="top_layers must be at least 0"):
        RewardConfig(top_layers=-1)


def test_split_is_by_problem():
    pairs = separable_pairs(20) + [
        Pair(3, "def f3(x):\n", "def f3(x):\n    return 0\n", "def f3(x):\n    pass\n")
    ]
    train, held_out = split_by_problem(pairs, 0.2, seed=1)
    train_problems = {p.problem_id for p in train}
    held_out_problems = {p.problem_id for p in held_out}
    assert len(held_out_problems) == 4 and not train_problems & held_out_problems
    assert len(train) + len(held_out) == len(pairs)
    assert split_by_problem(pairs, 0.2, seed=1) == (train, held_out)  # seeded
    # One problem cannot be split: everything trains, nothing is held out.
    assert split_by_problem(pairs[:1], 0.5, seed=0) == (pairs[:1], [])


def test_scorer_batches_and_padding_do_not_change_scores(trained_model):
    output, _, _ = trained_model
    prompts = ["def f(x):\n", "def g(x):\n", "Read n and print n squared."]
    codes = [
        "def f(x):\n    return x\n",
        "def g(x):\n    raise ValueError(x)  # a much longer line than the others\n",
        "n = int(input())\nprint(n * n)\n",
    ]
    scorer = RewardScorer(output, batch_size=1)
    one_by_one = scorer.score(prompts, codes)
    scorer.batch_size = 3
    right_padded = scorer.score(prompts, codes)
    scorer.tokenizer.padding_side = "left"
    left_padded = scorer.score(prompts, codes)

    assert len(one_by_one) == 3 and all(isinstance(s, float) for s in one_by_one)
    assert right_padded == pytest.approx(one_by_one, abs=1e-4)
    assert left_padded == pytest.approx(one_by_one, abs=1e-4)
    assert one_by_one[0] > one_by_one[1]  # it learned: returning beats raising
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 codes"):
        scorer.score(["a", "b"], ["c"])


def test_reward_text_includes_the_prompt_once():
    prompt = "def add(a, b):\n    '''Sum.'''\n"
    completion_style = prompt + "    return a + b\n"
    assert reward_text(prompt, completion_style) == completion_style
    assert reward_text("Print the sum of two numbers.", "print(1)") == (
        "Print the sum of two numbers.\n\nprint(1)"
    )
    assert reward_text("", "print(1)") == "print(1)"


def test_long_programs_keep_their_end(trained_model):
    output, _, _ = trained_model
    scorer = RewardScorer(output, max_length=16)
    padding = "# filler\n" * 200
    # Programs that differ only in their last line still get different scores.
    good, bad = scorer.score(["p", "p"], [padding + "return 1\n", padding + "raise ValueError\n"])
    assert good != bad


def test_unknown_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        RewardScorer(missing)


def test_unreadable_gguf_is_named(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00")  # a header cut short
    with pytest.raises(ModelNotFoundError, match="broken.gguf"):
        RewardScorer(broken)


def test_empty_pair_set_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="empty pair set"):
        train_reward_model([], tiny_config(tiny_model_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- against the store ---------------------------------------------------------------


def test_build_pairs_from_the_store(session):
    problem = make_problem(session)  # reference: "def add(a, b):\n    return a + b\n"
    passing = make_candidate(
        session, problem=problem, verdict=Verdict.OK, code="def add(a, b):\n    return b + a\n"
    )
    failing = make_candidate(
        session,
        problem=problem,
        verdict=Verdict.WRONG_ANSWER,
        code="def add(a, b):\n    return a\n",
    )
    hard = make_candidate(
        session, problem=problem, verdict=Verdict.RUNTIME_ERROR, code="def add(a, b):\n    1 / 0\n"
    )
    make_candidate(session, problem=problem, verdict=Verdict.SANDBOX_ERROR, code="sandbox broke")
    make_candidate(session, problem=problem, code="not yet executed")
    # The reference stored as a candidate too must not be paired twice.
    make_candidate(
        session,
        problem=problem,
        verdict=Verdict.OK,
        origin=Origin.REFERENCE,
        code=problem.reference_solution,
    )
    reward = make_model_version(session)
    session.add(
        HardNegativeLabel(candidate_id=hard.id, reward_model_version_id=reward.id, rule="x")
    )
    only_passing = make_problem(session)
    make_candidate(session, problem=only_passing, verdict=Verdict.OK)
    session.flush()

    pairs = build_pairs(session)

    assert {p.problem_id for p in pairs} == {problem.id}  # nothing to contrast on the other
    assert all(p.prompt == problem.prompt for p in pairs)
    rejected = [p.rejected for p in pairs]
    assert set(rejected) == {failing.code, hard.code}
    assert rejected[0] == hard.code  # hard negatives first
    assert {p.chosen for p in pairs} == {problem.reference_solution, passing.code}
    assert len(pairs) == 4  # 2 chosen x 2 rejected, no duplicates
    assert len(set(pairs)) == 4

    capped = build_pairs(session, max_pairs_per_problem=2)
    assert [p.rejected for p in capped] == [hard.code, failing.code]
    assert len({p.chosen for p in capped}) == 2  # the cap still varies the chosen side
    assert build_pairs(session, problem_ids=[only_passing.id]) == []


def _store_separable_problems(session, count: int = 12) -> None:
    for i in range(count):
        prompt = f"def f{i}(x):\n"
        problem = make_problem(
            session, prompt=prompt, reference_solution=f"{prompt}    return x + {i}\n"
        )
        make_candidate(
            session,
            problem=problem,
            verdict=Verdict.WRONG_ANSWER,
            code=f"{prompt}    raise ValueError({i})\n",
        )


def _reward_versions(session) -> int:
    return session.scalar(select(func.count()).select_from(ModelVersion))


def test_train_and_register(session, tiny_model_dir, tmp_path):
    _store_separable_problems(session)
    parent = make_model_version(session)

    version = train_and_register_reward_model(
        session, config=tiny_config(tiny_model_dir), data_dir=tmp_path, parent_id=parent.id
    )

    assert version.id is not None and version.parent_id == parent.id
    assert version.base_model == str(tiny_model_dir)
    assert version.metrics["train_pairs"] + version.metrics["eval_pairs"] == 12
    folder = Path(version.path)
    assert folder.parent == tmp_path.resolve() / "models" / "reward"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left
    assert len(RewardScorer(folder).score(["def f(x):\n"], ["def f(x):\n    return x\n"])) == 1


def test_failed_training_registers_nothing(session, tiny_model_dir, tmp_path):
    _store_separable_problems(session)
    before = _reward_versions(session)
    models_dir = tmp_path / "models" / "reward"
    seen: list[list[str]] = []

    def fail_midway(fraction: float) -> None:
        # A worker's progress heartbeat failing mid-training, e.g. a lost database.
        seen.append([p.name for p in models_dir.iterdir()])
        raise ConnectionError("heartbeat lost")

    with pytest.raises(ConnectionError, match="heartbeat lost"):
        train_and_register_reward_model(
            session, config=tiny_config(tiny_model_dir), data_dir=tmp_path, progress=fail_midway
        )

    assert seen and seen[0]  # the staging folder existed when training broke
    assert list(models_dir.iterdir()) == []
    assert _reward_versions(session) == before


def test_empty_store_registers_nothing(session, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="empty pair set"):
        train_and_register_reward_model(
            session, config=tiny_config(tiny_model_dir), data_dir=tmp_path
        )
    assert _reward_versions(session) == 0
    assert not (tmp_path / "models" / "reward").exists() or not any(
        (tmp_path / "models" / "reward").iterdir()
    )


@pytest.mark.slow
def test_bundled_gguf_backbone_trains_and_scores(tmp_path):
    """The default backbone: SmolLM2 from its GGUF, dequantized, gets a head and trains."""
    config = RewardConfig(epochs=1, batch_size=2, max_length=32, eval_fraction=0.5)
    assert config.backbone == "bundled:smollm2"

    metrics = train_reward_model(separable_pairs(4), config, tmp_path / "rm")

    assert (metrics["train_pairs"], metrics["eval_pairs"]) == (2, 2)
    assert math.isfinite(metrics["train_loss"])
    scores = RewardScorer(tmp_path / "rm").score(["def f(x):\n"] * 2, ["return x", "raise"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_build_pairs_puts_runs_caught_tampering_first(session):
    problem = make_problem(session)
    make_candidate(session, problem=problem, verdict=Verdict.WRONG_ANSWER, code="def add(a, b): 0")
    make_candidate(
        session,
        problem=problem,
        verdict=Verdict.WRONG_ANSWER,
        code="def add(a, b): print(TOKEN)",
        tamper_reason="success token printed before the tests ran",
    )
    session.flush()
    # Stored second, the forged run still takes the one pair: it is the hardest negative.
    [pair] = build_pairs(session, max_pairs_per_problem=1)
    assert pair.rejected == "def add(a, b): print(TOKEN)"
