"""The Python interface: stdin/stdout mode, batches, limits, caching and refusal."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from models.enums import Verdict
from pipelines.sandbox import ExecutionResult, Job, Limits, run_batch, run_one, runner
from pipelines.sandbox.runner import CACHE_DIR

from .conftest import require_toolchain

REPO = Path(__file__).resolve().parents[3]
SUM_CASES = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "10 -4\n", "output": "  6  \n\n"},
    {"input": "5 5", "output": "10"},
]
SUM_PROGRAMS = {
    "python": "a, b = map(int, input().split())\nprint(a + b)\n",
    "cpp": "#include <iostream>\n"
    "int main() { long a, b; std::cin >> a >> b; std::cout << a + b << '\\n'; }\n",
    "java": "import java.util.*;\npublic class Main { public static void main(String[] x) {\n"
    "  Scanner s = new Scanner(System.in); System.out.println(s.nextLong() + s.nextLong()); } }\n",
    "javascript": "const [a, b] = require('fs').readFileSync(0, 'utf8')\n"
    "  .trim().split(/\\s+/).map(Number);\nconsole.log(a + b);\n",
    "php": '<?php\nfscanf(STDIN, "%d %d", $a, $b);\necho $a + $b, "\\n";\n',
    "csharp": "using System;\nclass P { static void Main() {\n"
    "  var t = Console.ReadLine().Split(' ');\n"
    "  Console.WriteLine(long.Parse(t[0]) + long.Parse(t[1])); } }\n",
    "bash": "read a b\necho $((a + b))\n",
}


@pytest.mark.parametrize("language", sorted(SUM_PROGRAMS))
def test_stdin_stdout_mode_compares_tokens_not_whitespace(language: str) -> None:
    require_toolchain(language)
    result = run_one(language, SUM_PROGRAMS[language], "", io_cases=SUM_CASES)
    assert (result.verdict, result.passed, result.total) == (Verdict.OK, 3, 3), result


def test_stdin_stdout_mode_counts_passed_cases_and_reports_the_first_failure() -> None:
    program = "a, b = map(int, input().split())\nprint(a + b if a != 10 else a * b)\n"
    result = run_one("python", program, "", io_cases=SUM_CASES)
    assert (result.verdict, result.passed, result.total) == (Verdict.WRONG_ANSWER, 2, 3)
    crash = run_one("python", "raise SystemExit(3)\n", "", io_cases=SUM_CASES[:1])
    assert (crash.verdict, crash.passed) == (Verdict.RUNTIME_ERROR, 0)


def test_stdin_stdout_mode_timeout_stops_early() -> None:
    started = time.monotonic()
    result = run_one(
        "python", "while True:\n    pass\n", "", io_cases=SUM_CASES, limits=Limits(timeout_s=1)
    )
    assert (result.verdict, result.passed, result.total) == (Verdict.TIME_LIMIT, 0, 3)
    assert time.monotonic() - started < 6


def test_batch_keeps_job_order_and_limits_are_per_job() -> None:
    jobs = [Job("python", f"x = {i}\n", f"assert x == {i if i % 3 else -1}\n") for i in range(12)]
    jobs.append(Job("python", "import time\ntime.sleep(5)\n", "", limits=Limits(timeout_s=0.5)))
    results = run_batch(jobs, workers=3)
    assert [r.verdict for r in results[:12]] == [
        Verdict.WRONG_ANSWER if i % 3 == 0 else Verdict.OK for i in range(12)
    ]
    assert results[12].verdict == Verdict.TIME_LIMIT
    assert run_batch([]) == []


def test_unknown_language_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'cobol'.*python, cpp, java"):
        run_one("cobol", "", "")
    with pytest.raises(ValueError, match="cobol"):
        run_batch([Job("python", "", ""), Job("cobol", "", "")])


def test_result_serialises_to_json() -> None:
    result = run_one("python", "print('hi')\n", "")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["verdict"] == "OK" and data["total"] == 1 and "hi" in data["stdout_tail"]
    assert set(data) == set(ExecutionResult.__dataclass_fields__)
    assert Limits() == Limits(timeout_s=10.0, memory_mb=512, output_bytes=64 * 1024)


def test_memory_limit_of_a_single_process() -> None:
    hog = "block = bytearray(400 << 20)\nfor i in range(0, len(block), 4096):\n    block[i] = 1\n"
    result = run_one("python", hog, "", limits=Limits(memory_mb=128))
    assert result.verdict == Verdict.MEMORY_LIMIT, result
    assert run_one("python", hog, "", limits=Limits(memory_mb=1024)).verdict == Verdict.OK


def test_java_respects_the_memory_limit() -> None:
    require_toolchain("java")
    code = (
        "import java.util.*;\nclass Problem {\n    public static void main(String[] args) {\n"
        "        List<long[]> keep = new ArrayList<>();\n"
        "        while (true) keep.add(new long[1 << 20]);\n    }\n"
    )
    result = run_one("java", code, "}\n", limits=Limits(memory_mb=256))
    assert result.verdict == Verdict.MEMORY_LIMIT, result


def test_compiled_artefacts_are_cached_by_content(samples) -> None:
    require_toolchain("cpp")
    marker = f"// cache probe {time.time_ns()}\n"
    code = marker + samples["cpp"].right
    before = set(CACHE_DIR.iterdir())
    started = time.monotonic()
    assert run_one("cpp", code, samples["cpp"].tests).verdict == Verdict.OK
    first = time.monotonic() - started
    added = set(CACHE_DIR.iterdir()) - before
    assert len(added) == 1 and (next(iter(added)) / "ok").exists()
    started = time.monotonic()
    assert run_one("cpp", code, samples["cpp"].tests).verdict == Verdict.OK
    second = time.monotonic() - started
    assert set(CACHE_DIR.iterdir()) - before == added  # no second compile
    assert second < first / 2, (first, second)


def test_refuses_without_isolation_unless_insecure_is_set() -> None:
    script = (
        "from pipelines.sandbox import run_one\n"
        "print(run_one('python', 'x = 1', 'assert x == 1').verdict)\n"
    )
    # Without bwrap on PATH the probe finds no isolation.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RR_SANDBOX")}
    # The sandbox user must reach the runtime folder, so not under pytest's private tmp.
    runtime = Path(tempfile.mkdtemp(prefix="rr-sandbox-insecure-"))
    runtime.chmod(0o755)
    env.update(PATH=str(runtime), PYTHONPATH=str(REPO), RR_SANDBOX_DIR=str(runtime / "rt"))
    refused = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "RR_SANDBOX_INSECURE=1" in refused.stderr and "bwrap" in refused.stderr
    env["RR_SANDBOX_INSECURE"] = "1"
    allowed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    shutil.rmtree(runtime)
    assert allowed.stdout.strip() == "OK", allowed.stderr


def test_warm_interpreters_outlive_the_batch_threads() -> None:
    """bwrap dies with the thread that started it; batch threads must not take zygotes along."""
    jobs = [Job("python", "x = 1\n", "assert x == 1\n") for _ in range(4)]
    assert {r.verdict for r in run_batch(jobs, workers=2)} == {Verdict.OK}
    time.sleep(0.3)
    # Slots whose zygote was stopped on purpose (after a timeout, say) hold None.
    started = [slot.zygote for slot in runner._POOL._all if slot.zygote is not None]
    assert len(started) >= 2 and all(zygote.poll() is None for zygote in started)
