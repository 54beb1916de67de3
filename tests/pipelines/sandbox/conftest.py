"""MultiPL-E-shaped programs for every language, and the toolchain check.

Each language has one problem, `add(a, b)`, written the way MultiPL-E stores
it: `code` is the prompt plus a completion, `tests` is the MultiPL-E test
program that is appended to it.
"""

import shutil
from dataclasses import dataclass

import pytest

from pipelines.sandbox.languages import BUILD, RECIPES
from pipelines.sandbox.runner import typescript_dir
from tests.conftest import unavailable


@dataclass(frozen=True)
class Sample:
    """Completions of one language's `add` problem, good and bad."""

    right: str
    wrong: str
    crash: str
    hang: str
    broken: str  # does not compile (or parse)
    tests: str
    print_line: str  # a statement printing "hello" (for stdin/stdout mode)


def _py(body: str) -> str:
    return f"def add(a, b):\n{body}\n"


def _cpp(body: str) -> str:
    return f"#include<assert.h>\n#include<bits/stdc++.h>\nlong add(long a, long b) {{\n{body}\n}}\n"


def _java(body: str) -> str:
    return (
        "import java.util.*;\nimport java.lang.*;\n\nclass Problem {\n"
        f"    public static long add(long a, long b) {{\n{body}\n    }}\n"
    )


def _js(body: str) -> str:
    return f"function add(a, b){{\n{body}\n}}\n"


def _ts(body: str) -> str:
    return f"function add(a: number, b: number): number {{\n{body}\n}}\n"


def _php(body: str) -> str:
    return f"<?php\nfunction add($a, $b) {{\n{body}\n}}\n"


def _cs(body: str) -> str:
    return (
        "using System;\nusing System.Numerics;\nusing System.Diagnostics;\n"
        "using System.Collections.Generic;\nusing System.Linq;\nusing System.Text;\n"
        "using System.Security.Cryptography;\nclass Problem {\n"
        f"    public static long Add(long a, long b) {{\n{body}\n    }}\n"
    )


def _sh(body: str) -> str:
    return f"#!/bin/bash\nadd() {{\n{body}\n}}\n"


SAMPLES: dict[str, Sample] = {
    "python": Sample(
        right=_py("    return a + b"),
        wrong=_py("    return a - b"),
        crash=_py("    return [][a]"),
        hang=_py("    while True:\n        pass"),
        broken=_py("    return a +"),
        tests="def check(candidate):\n    assert candidate(1, 2) == 3\n"
        "    assert candidate(-1, 1) == 0\n\ncheck(add)\n",
        print_line="print('hello')",
    ),
    "cpp": Sample(
        right=_cpp("    return a + b;"),
        wrong=_cpp("    return a - b;"),
        crash=_cpp("    std::vector<long> v; return v.at(a);"),
        hang=_cpp("    volatile long x = 0; while (true) { x++; } return x;"),
        broken=_cpp("    return a +;"),
        tests="int main() {\n    auto candidate = add;\n    assert(candidate((1), (2)) == (3));\n"
        "    assert(candidate((-1), (1)) == (0));\n}\n",
        print_line='int main() { std::puts("hello"); }',
    ),
    "java": Sample(
        right=_java("        return a + b;"),
        wrong=_java("        return a - b;"),
        crash=_java("        long[] none = new long[0];\n        return none[(int) a];"),
        hang=_java("        while (true) { a++; }"),
        broken=_java("        return a +;"),
        tests="    public static void main(String[] args) {\n    assert(add((1l), (2l)) == (3l));\n"
        "    assert(add((-1l), (1l)) == (0l));\n    }\n\n}\n",
        print_line="",
    ),
    "javascript": Sample(
        right=_js("  return a + b;"),
        wrong=_js("  return a - b;"),
        crash=_js("  return null.x;"),
        hang=_js("  while (true) {}"),
        broken=_js("  return a +;"),
        tests="const assert = require('node:assert');\n\n\nfunction test() {\n"
        "  let candidate = add;\n  assert.deepEqual(candidate(1, 2),3);\n"
        "  assert.deepEqual(candidate(-1, 1),0);\n}\n\ntest();\n",
        print_line="console.log('hello');",
    ),
    "typescript": Sample(
        right=_ts("  return a + b;"),
        wrong=_ts("  return a - b;"),
        crash=_ts("  return (null as any).x;"),
        hang=_ts("  while (true) {}"),
        broken=_ts('  return "not a number";'),
        tests="declare var require: any;\nconst assert = require('node:assert');\n\n\n"
        "function test() {\n"
        "  let candidate = add;\n  assert.deepEqual(candidate(1, 2),3);\n"
        "  assert.deepEqual(candidate(-1, 1),0);\n}\n\ntest();\n",
        print_line="console.log('hello');",
    ),
    "php": Sample(
        right=_php("  return $a + $b;"),
        wrong=_php("  return $a - $b;"),
        crash=_php("  return intdiv($a, 0);"),
        hang=_php("  while (true) {}"),
        broken=_php("  return $a +;"),
        tests="function candidate(...$args) {\n    return add(...$args);\n}\n\n"
        "function test(): void {\n"
        '    if (candidate(1, 2) !== 3) { throw new Exception("Test failed!"); }\n'
        '    if (candidate(-1, 1) !== 0) { throw new Exception("Test failed!"); }\n}\n\ntest();',
        print_line='<?php echo "hello\\n";',
    ),
    "csharp": Sample(
        right=_cs("        return a + b;"),
        wrong=_cs("        return a - b;"),
        crash=_cs("        return new long[0][a];"),
        hang=_cs("        while (true) { a++; }"),
        broken=_cs("        return a +;"),
        tests="    public static void Main(string[] args) {\n"
        "    Debug.Assert(Add((1L), (2L)) == (3L));\n"
        "    Debug.Assert(Add((-1L), (1L)) == (0L));\n    }\n\n}\n",
        print_line="",
    ),
    "bash": Sample(
        right=_sh("    echo $(( $1 + $2 ))"),
        wrong=_sh("    echo $(( $1 - $2 ))"),
        crash=_sh("    kill -SEGV $$"),
        hang=_sh("    while true; do :; done"),
        broken=_sh("    if then fi ((("),
        tests='candidate() {\n    add "$@"\n}\n\nset -e\nrun_test() {\n'
        '    [[ $(candidate "1" "2") = "3" ]]\n'
        '    [[ $(candidate "-1" "1") = "0" ]]\n}\n\nrun_test\n',
        print_line="echo hello",
    ),
}

assert set(SAMPLES) == {language.value for language in RECIPES}


def require_toolchain(language: str) -> None:
    """Skip locally, fail in CI, when a language's compiler or runtime is missing."""
    recipe = RECIPES[language]  # type: ignore[index]
    binaries = [recipe.compile[0]] if recipe.compile else []
    if not recipe.run[0].startswith(BUILD):  # not an artefact of the compile step
        binaries.append(recipe.run[0])
    missing = [b for b in binaries if shutil.which(b) is None]
    if language == "typescript":
        try:
            typescript_dir()
        except FileNotFoundError as error:
            missing.append(str(error))
    if missing:
        unavailable(f"{language} toolchain missing: {', '.join(missing)}")


@pytest.fixture(scope="session")
def samples() -> dict[str, Sample]:
    return SAMPLES


@pytest.fixture(autouse=True, scope="session")
def isolated_host() -> None:
    """These tests exercise the real sandbox: without bwrap they cannot mean anything."""
    from pipelines.sandbox import isolation

    host = isolation.probe_host()
    missing = []
    if not host.isolated:
        missing.append(f"bwrap sandbox ({host.bwrap_error})")
    if host.cgroup_version is None:
        missing.append("writable cgroups (run the tests as root)")
    if missing:
        unavailable("sandbox layers unavailable: " + "; ".join(missing))
