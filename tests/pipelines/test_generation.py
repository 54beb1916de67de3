"""Generation backends: the shapes they promise, stop sequences, chat replies,
and mutants that are distinct, different from the reference, and mostly wrong."""

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.enums import Language
from pipelines.generation import (
    STOP_SEQUENCES,
    GenerationConfig,
    PromptSpec,
    Sample,
    TransformersGenerator,
    completion_from_reply,
    cut_at_stop,
    make_generator,
)
from pipelines.loading import ModelNotFoundError

PY_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
CPP_PROMPT = "long add(long a, long b) {\n"
PROMPTS = [
    PromptSpec(1, "python", PY_PROMPT),
    PromptSpec(2, "cpp", CPP_PROMPT),
    PromptSpec(3, "python", "def is_even(n):\n"),
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir: Path) -> Iterator[tuple]:
    """The tiny model and tokenizer, loaded once for the transformers tests.

    One torch thread: on a shared 2-core machine two spinning threads per
    process made generation ten times slower."""
    import torch

    from pipelines.loading import load_causal_lm, load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    torch.set_num_threads(threads)


def tiny(tiny_lm: tuple, **overrides) -> TransformersGenerator:
    """A transformers generator on the shared tiny model (greedy unless told)."""
    model, tokenizer = tiny_lm
    settings = {"max_new_tokens": 10, "temperature": 0.0, "prompt_style": "completion"}
    config = GenerationConfig(model="tiny", **(settings | overrides))
    return TransformersGenerator(config, model=model, tokenizer=tokenizer)


# --- transformers -----------------------------------------------------------


def test_make_generator_loads_the_model_it_names(tiny_lm, tiny_model_dir: Path) -> None:
    config = GenerationConfig(
        model=str(tiny_model_dir), max_new_tokens=4, prompt_style="completion"
    )
    generator = make_generator(config)
    [[sample]] = generator.generate(PROMPTS[:1], 1)
    assert sample.code.startswith(PY_PROMPT) and 0 < sample.num_tokens <= 4


def test_transformers_returns_n_samples_per_prompt_in_order(tiny_lm) -> None:
    results = tiny(tiny_lm, batch_size=8).generate(PROMPTS, 3)

    assert [len(samples) for samples in results] == [3, 3, 3]
    for prompt, samples in zip(PROMPTS, results, strict=True):
        for sample in samples:
            assert isinstance(sample, Sample)
            assert sample.code == prompt.prompt + sample.completion
            assert 0 < sample.num_tokens <= 10
            assert sample.completion == cut_at_stop(sample.completion, Language(prompt.language))


def test_batching_across_problems_matches_one_problem_at_a_time(tiny_lm) -> None:
    """Left padding and the reordering by language/length must not change what a
    prompt gets, nor which prompt gets it."""
    batched = tiny(tiny_lm, batch_size=6).generate(PROMPTS, 2)
    single = tiny(tiny_lm, batch_size=1)
    for prompt, samples in zip(PROMPTS, batched, strict=True):
        assert single.generate([prompt], 2) == [samples]


def test_sampling_is_seeded(tiny_lm) -> None:
    def run(seed: int) -> list[list[Sample]]:
        return tiny(tiny_lm, temperature=1.0, max_new_tokens=6, seed=seed).generate(PROMPTS[:1], 4)

    first = run(0)
    assert first == run(0)
    assert first != run(1)
    assert len({sample.code for sample in first[0]}) > 1  # sampling, not 4 copies


def test_chat_style_wraps_the_prompt_and_still_returns_a_whole_program(tiny_lm) -> None:
    generator = tiny(tiny_lm, prompt_style="chat", max_new_tokens=6)
    assert generator.chat  # the bundled tokenizer has a chat template
    [samples] = generator.generate(PROMPTS[:1], 2)
    assert len(samples) == 2
    assert all(s.code.startswith(PY_PROMPT) and s.num_tokens > 0 for s in samples)


def test_empty_prompt_list_gives_empty_output(tiny_lm) -> None:
    assert tiny(tiny_lm).generate([], 4) == []


def test_bad_input_names_the_problem(tiny_lm) -> None:
    generator = tiny(tiny_lm)
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        GenerationConfig(backend="tgi")
    with pytest.raises(ValueError, match="unknown language 'cobol'"):
        PromptSpec(1, "cobol", "IDENTIFICATION DIVISION.")
    with pytest.raises(ValueError, match="problem 7: empty prompt"):
        generator.generate([PromptSpec(7, "python", "  ")], 1)
    with pytest.raises(ValueError, match="n must be at least 1"):
        generator.generate(PROMPTS, 0)
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        make_generator(GenerationConfig(model="/tmp/no-such-model"))


def test_prompt_spec_from_problem() -> None:
    from models import Problem

    problem = Problem(
        id=5, language=Language.BASH, prompt="f() {\n", reference_solution="f() {\n  echo 1\n}\n"
    )
    assert PromptSpec.from_problem(problem) == PromptSpec(
        5, "bash", "f() {\n", problem.reference_solution
    )


# --- stop sequences and chat replies (pure text handling) -------------------


@pytest.mark.parametrize(
    ("language", "completion", "expected"),
    [
        ("python", "    return a + b\n\n\ndef other():\n", "    return a + b\n\n"),
        ("python", "    return 1\nprint(add(1, 2))", "    return 1"),
        ("python", "    return 1\n# test\n", "    return 1"),
        ("javascript", "  return a + b;\n}\nconsole.log(add(1, 2));", "  return a + b;\n}"),
        ("typescript", "  return a;\n}\nexport {};", "  return a;\n}"),
        ("php", "  return $a;\n}\n?>", "  return $a;\n}"),
        ("cpp", "    return a + b;\n}\nint main() {}", "    return a + b;\n}"),
        (
            "java",
            "        return a;\n    }\n    public static void main",
            "        return a;\n    }",
        ),
        ("csharp", "        return a;\n    }\n}\n", "        return a;\n    }"),
        ("bash", "  echo $(( $1 + $2 ))\n}\nadd 1 2", "  echo $(( $1 + $2 ))\n}"),
    ],
)
def test_cut_at_stop_per_language(language: str, completion: str, expected: str) -> None:
    assert cut_at_stop(completion, Language(language)) == expected


def test_every_language_has_stop_sequences() -> None:
    assert set(STOP_SEQUENCES) == set(Language)


def test_chat_reply_code_is_taken_from_its_fenced_block() -> None:
    reply = (
        'Sure! Here it is:\n```python\ndef add(a, b):\n    """Return a + b."""\n'
        "    return a + b\n```\nThis adds."
    )
    completion = completion_from_reply(reply, PY_PROMPT, Language.PYTHON)
    assert completion == '    """Return a + b."""\n    return a + b\n'

    bare_body = completion_from_reply("```\nreturn a + b\n```", PY_PROMPT, Language.PYTHON)
    assert bare_body == "    return a + b\n"  # indented under the prompt's function

    cpp = completion_from_reply(
        "```cpp\nlong add(long a, long b) {\n    return a + b;\n}\n```", CPP_PROMPT, Language.CPP
    )
    assert cut_at_stop(cpp, Language.CPP) == "    return a + b;\n}"


# --- vLLM -------------------------------------------------------------------
# This machine has no GPU and no vLLM, so a stand-in `vllm` module takes the
# place of the real one; what is tested is our request building and the
# parsing of vLLM's response objects, not vLLM.


class _StandInLLM:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[str], list]] = []

    def generate(self, prompts: list[str], params: list) -> list:
        self.calls.append((prompts, params))
        replies = {"python": "    return a + b\n", "cpp": "    return a + b;\n"}
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(
                        text=f"{replies['cpp' if '{' in prompt else 'python']}# {k}",
                        token_ids=[7] * (k + 3),
                    )
                    for k in range(param.n)
                ]
            )
            for prompt, param in zip(prompts, params, strict=True)
        ]


@pytest.fixture
def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = _StandInLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_builds_one_request_per_prompt_and_parses_samples(
    stand_in_vllm, tiny_model_dir: Path
) -> None:
    config = GenerationConfig(
        backend="vllm", model=str(tiny_model_dir), max_new_tokens=64, prompt_style="completion"
    )
    generator = make_generator(config)
    results = generator.generate(PROMPTS[:2], 3)

    [(texts, params)] = generator.llm.calls
    assert texts == [PY_PROMPT, CPP_PROMPT]
    assert [p.n for p in params] == [3, 3]
    assert params[0].stop == list(STOP_SEQUENCES[Language.PYTHON])
    assert params[1].stop == list(STOP_SEQUENCES[Language.CPP])
    assert params[0].max_tokens == 64
    assert [len(samples) for samples in results] == [3, 3]
    # Leaves the card's rest to a training in the same GPU worker.
    assert generator.llm.kwargs["gpu_memory_utilization"] == config.gpu_memory_fraction < 1
    assert results[0][2] == Sample(PY_PROMPT + "    return a + b", "    return a + b", 5)
    assert results[1][0].code == CPP_PROMPT + "    return a + b;\n# 0"


def test_vllm_chat_style_sends_the_chat_template(stand_in_vllm, tiny_model_dir: Path) -> None:
    config = GenerationConfig(backend="vllm", model=str(tiny_model_dir), prompt_style="chat")
    generator = make_generator(config)
    generator.generate(PROMPTS[:1], 1)
    [(texts, params)] = generator.llm.calls
    assert "<|im_start|>" in texts[0] and PY_PROMPT in texts[0]
    assert params[0].stop is None


def test_vllm_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail here
    with pytest.raises(ImportError, match=r"\.\[gpu\]"):
        make_generator(GenerationConfig(backend="vllm"))


# --- the bundled model --------------------------------------------------------


@pytest.mark.slow
def test_bundled_smollm2_writes_code_through_its_chat_template() -> None:
    """The default model is an instruct model: `auto` picks its chat template
    (in plain completion it opens a Markdown fence and stops)."""
    generator = make_generator(GenerationConfig(max_new_tokens=48, temperature=0.2))
    assert generator.chat
    [samples] = generator.generate([PromptSpec(1, "python", PY_PROMPT)], 2)

    assert len(samples) == 2
    for sample in samples:
        assert sample.code.startswith(PY_PROMPT) and 0 < sample.num_tokens <= 48
    # A real model writes code, not noise: some sample returns something.
    assert any("return" in sample.completion for sample in samples)
