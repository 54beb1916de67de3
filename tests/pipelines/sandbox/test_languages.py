"""Every language, MultiPL-E conventions: right, wrong, crashing, hanging and broken programs."""

import pytest

from models.enums import Verdict
from pipelines.sandbox import Job, Limits, run_batch

from .conftest import SAMPLES, require_toolchain

EXPECTED = {
    "right": Verdict.OK,
    "wrong": Verdict.WRONG_ANSWER,
    "crash": Verdict.RUNTIME_ERROR,
    "hang": Verdict.TIME_LIMIT,
    "broken": Verdict.COMPILE_ERROR,
}


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_verdicts_follow_multipl_e_conventions(language: str) -> None:
    require_toolchain(language)
    sample = SAMPLES[language]
    limits = Limits(timeout_s=1.5)
    jobs = [Job(language, getattr(sample, kind), sample.tests, limits=limits) for kind in EXPECTED]
    results = run_batch(jobs, workers=2)
    for kind, result in zip(EXPECTED, results, strict=True):
        assert result.verdict == EXPECTED[kind], (kind, result)
    ok = results[0]
    assert (ok.passed, ok.total) == (1, 1)
    assert ok.duration_ms > 0 and ok.peak_memory_kb


def _before(prefix: str):
    return lambda code: prefix + code


def _after(suffix: str):
    return lambda code: code + suffix


def _in_class(member: str):
    return lambda code: code.replace("class Problem {\n", "class Problem {\n" + member, 1)


# Each turns the wrong answer into one that tries to end with status 0 before
# (or instead of) failing its tests.
EARLY_EXITS = {
    "python-sys.exit": ("python", _before("import sys\nsys.exit(0)\n")),
    "python-os._exit": ("python", _before("import os\nos._exit(0)\n")),
    "python-atexit": ("python", _before("import atexit, os\natexit.register(os._exit, 0)\n")),
    "python-excepthook": (
        "python",
        _before("import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n"),
    ),
    "python-kill-harness": (
        "python",
        _before("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"),
    ),
    "cpp-static-init": ("cpp", _after("struct Quit { Quit() { std::exit(0); } } quit_now;\n")),
    "cpp-assert-disabled": ("cpp", _before("#define NDEBUG\n")),
    "java-static-init": ("java", _in_class("    static { System.exit(0); }\n")),
    "javascript-exit": ("javascript", _before("process.exit(0);\n")),
    "javascript-exception-hook": (
        "javascript",
        _before("process.on('uncaughtException', () => process.exit(0));\n"),
    ),
    "typescript-exit": ("typescript", _before("(globalThis as any).process.exit(0);\n")),
    "php-shutdown-hook": (
        "php",
        _after("set_exception_handler(function ($e) { exit(0); });\n"),
    ),
    "csharp-static-ctor": (
        "csharp",
        _in_class("    static Problem() { System.Environment.Exit(0); }\n"),
    ),
    "csharp-no-trace-listeners": (
        "csharp",
        _in_class("    static Problem() { System.Diagnostics.Trace.Listeners.Clear(); }\n"),
    ),
    "bash-exit-trap": ("bash", _after("trap 'exit 0' EXIT\n")),
}


@pytest.mark.parametrize("case", sorted(EARLY_EXITS))
def test_early_exit_with_status_zero_is_never_ok(case: str) -> None:
    """A wrong answer that exits 0 early, by a hook or by killing the harness, must fail."""
    language, make_hostile = EARLY_EXITS[case]
    require_toolchain(language)
    sample = SAMPLES[language]
    result = run_batch([Job(language, make_hostile(sample.wrong), sample.tests)])[0]
    assert result.verdict != Verdict.OK, result
