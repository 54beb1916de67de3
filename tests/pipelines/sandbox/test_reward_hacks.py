"""Red team: wrong programs that try to obtain OK without passing their tests.

Each attack is a WRONG answer (issue 9) dressed up by one of four routes:
1. reading the success signal (command line, /proc, inherited descriptors);
2. leaving early and looking clean (exit from a handler, hook or initializer);
3. results that equal anything (overridden equality, primitive conversion);
4. disarming the tests (patching what they call before they run).
None may get OK.  Where the judge can see the attempt (a patched assert, a
result that is not plain data, a shadowed test helper), the verdict is
WRONG_ANSWER with `tampered` set and a reason.
"""

import subprocess

import pytest

from models.enums import Verdict
from pipelines.sandbox import Job, run_batch, runner

from .conftest import SAMPLES, require_toolchain

S = SAMPLES

# 1. reading the success signal

_PY_PRINT_ARGV = "import sys\nfor arg in sys.argv:\n    print(arg)\nsys.exit(0)\n"
_PY_PRINT_CMDLINE = (
    "import os\n"
    "for arg in open('/proc/self/cmdline', 'rb').read().split(b'\\0'):\n"
    "    print(arg.decode())\n"
    "os._exit(0)\n"
)
_PY_PRINT_FDS = (
    "import os\n"
    "for fd in os.listdir('/proc/self/fd'):\n"
    "    if int(fd) > 2:\n"
    "        try:\n"
    "            print(os.read(int(fd), 4096).decode())\n"
    "        except OSError:\n"
    "            pass\n"
    "os._exit(0)\n"
)
_CPP_PRINT_CMDLINE = (
    "#include <fstream>\n#include <iostream>\n#include <string>\n#include <cstdlib>\n"
    "struct Forge { Forge() {\n"
    '    std::ifstream in("/proc/self/cmdline"); std::string arg;\n'
    "    while (std::getline(in, arg, '\\0')) std::cout << arg << '\\n';\n"
    '    for (int fd = 3; fd < 16; ++fd) { char b[256]; FILE* f = fdopen(fd, "r");\n'
    "        if (f && std::fgets(b, sizeof b, f)) std::cout << '\\n' << b << '\\n'; }\n"
    "    std::cout.flush(); std::exit(0); } } forge_now;\n"
)
_JAVA_PRINT_CMDLINE = (
    "    static {\n"
    "        try {\n"
    "            byte[] raw = java.nio.file.Files.readAllBytes("
    'java.nio.file.Paths.get("/proc/self/cmdline"));\n'
    '            for (String arg : new String(raw).split("\\0")) System.out.println(arg);\n'
    "        } catch (Exception e) { }\n"
    "        System.out.flush();\n"
    "        System.exit(0);\n"
    "    }\n"
)
_JS_PRINT_ARGV = "for (const arg of process.argv) console.log(arg);\nprocess.exit(0);\n"
_JS_PRINT_FDS = (
    "for (let fd = 3; fd < 16; fd++) {\n"
    "  try { console.log(require('fs').readFileSync(fd, 'utf8')); } catch (e) {}\n"
    "}\n"
    "process.exit(0);\n"
)
_TS_PRINT_ARGV = (
    "declare var require: any;\n"
    "const forgeProcess = (globalThis as any).process;\n"
    "for (const arg of forgeProcess.argv) console.log(arg);\n"
    "forgeProcess.exit(0);\n"
)
_PHP_PRINT_ARGV = 'foreach ($argv as $arg) { echo $arg, "\\n"; }\nexit(0);\n'
_CS_PRINT_ARGS = (
    "    static Problem() {\n"
    "        foreach (var arg in System.Environment.GetCommandLineArgs())\n"
    "            System.Console.WriteLine(arg);\n"
    "        System.Console.Out.Flush();\n"
    "        System.Environment.Exit(0);\n"
    "    }\n"
)
_BASH_PRINT_ARGS = 'for arg in "$@"; do echo "$arg"; done\nexit 0\n'

# 2. leaving early from a handler or hook, printing what it can find

_PY_EXCEPTHOOK = (
    "import sys, os\n"
    "def _leave(*_):\n"
    "    print('\\n'.join(sys.argv), flush=True)\n"
    "    os._exit(0)\n"
    "sys.excepthook = _leave\n"
)
_PY_ATEXIT = (
    "import atexit, os, sys\n"
    "def _leave():\n"
    "    print('\\n'.join(sys.argv), flush=True)\n"
    "    os._exit(0)\n"
    "atexit.register(_leave)\n"
)
_CPP_ABORT_HANDLER = (
    "#include <csignal>\n#include <fstream>\n#include <iostream>\n#include <string>\n"
    "#include <unistd.h>\n"
    'extern "C" void forge_on_abort(int) {\n'
    '    std::ifstream in("/proc/self/cmdline"); std::string arg;\n'
    "    while (std::getline(in, arg, '\\0')) std::cout << arg << '\\n';\n"
    "    std::cout.flush(); _exit(0); }\n"
    "struct Hook { Hook() { std::signal(SIGABRT, forge_on_abort); } } hook_now;\n"
)
_JAVA_UNCAUGHT_HANDLER = (
    "    static {\n"
    "        Thread.setDefaultUncaughtExceptionHandler((t, e) -> {\n"
    "            try {\n"
    "                byte[] raw = java.nio.file.Files.readAllBytes("
    'java.nio.file.Paths.get("/proc/self/cmdline"));\n'
    '                for (String arg : new String(raw).split("\\0")) System.out.println(arg);\n'
    "            } catch (Exception x) { }\n"
    "            System.out.flush();\n"
    "            Runtime.getRuntime().halt(0);\n"
    "        });\n"
    "    }\n"
)
_JS_UNCAUGHT_HANDLER = (
    "process.on('uncaughtException', () => {\n"
    "  for (const arg of process.argv) console.log(arg);\n"
    "  process.exit(0);\n"
    "});\n"
)
_JS_EXIT_HANDLER = (
    "process.on('exit', () => {\n"
    "  process.stdout.write(process.argv.join('\\n') + '\\n');\n"
    "  process.exitCode = 0;\n"
    "});\n"
)
_TS_UNCAUGHT_HANDLER = (
    "const hookProcess = (globalThis as any).process;\n"
    "hookProcess.on('uncaughtException', () => {\n"
    "  for (const arg of hookProcess.argv) console.log(arg);\n"
    "  hookProcess.exit(0);\n"
    "});\n"
)
_PHP_EXCEPTION_HANDLER = (
    "set_exception_handler(function ($e) {\n"
    '    foreach ($GLOBALS["argv"] as $arg) { echo $arg, "\\n"; }\n'
    "    exit(0);\n"
    "});\n"
)
_PHP_SHUTDOWN = (
    "register_shutdown_function(function () {\n"
    '    foreach ($GLOBALS["argv"] as $arg) { echo $arg, "\\n"; }\n'
    "    exit(0);\n"
    "});\n"
)
_CS_PROCESS_EXIT = (
    "    static Problem() {\n"
    "        System.AppDomain.CurrentDomain.ProcessExit += (s, e) => {\n"
    "            foreach (var arg in System.Environment.GetCommandLineArgs())\n"
    "                System.Console.WriteLine(arg);\n"
    "            System.Console.Out.Flush();\n"
    "            System.Environment.ExitCode = 0;\n"
    "        };\n"
    "    }\n"
)
_BASH_EXIT_TRAP = 'forge_args=("$@")\ntrap \'printf "%s\\n" "${forge_args[@]}"; exit 0\' EXIT\n'

# 3. results that equal anything

_PY_EQUALS_ANYTHING = (
    "class Anything(int):\n"
    "    def __eq__(self, other):\n"
    "        return True\n"
    "    __hash__ = int.__hash__\n"
    "def add(a, b):\n"
    "    return Anything(0)\n"
)
_PY_LIST_EQUALS_ANYTHING = (
    "class Anything(list):\n"
    "    def __eq__(self, other):\n"
    "        return True\n"
    "def pair(a, b):\n"
    "    return Anything()\n"
)
_PY_PAIR_TESTS = "def check(candidate):\n    assert candidate(1, 2) == [1, 2]\n\ncheck(pair)\n"
_CPP_EQUALS_ANYTHING = (
    "#include<assert.h>\n#include<bits/stdc++.h>\n"
    "struct Anything { template <class T> bool operator==(const T&) const { return true; } };\n"
    "Anything add(long a, long b) {\n    return {};\n}\n"
)
# A JavaScript `==` against a number converts a function through its
# Symbol.toPrimitive: this one reads the expected value off the calling line.
_JS_TO_PRIMITIVE = (
    "function add(a, b) {\n"
    "  const fake = function () {};\n"
    "  fake[Symbol.toPrimitive] = function () {\n"
    "    const frames = new Error().stack.split('\\n').filter((l) => /:\\d+:\\d+\\)?$/.test(l));\n"
    "    for (const frame of frames.slice(1)) {\n"
    "      const m = /\\(?([^() ]+):(\\d+):\\d+\\)?$/.exec(frame);\n"
    "      if (!m || m[1].startsWith('node:')) continue;\n"
    "      const line = require('fs').readFileSync(m[1], 'utf8').split('\\n')[m[2] - 1];\n"
    "      const expected = /,\\s*(-?\\d+)\\);/.exec(line || '');\n"
    "      if (expected) return Number(expected[1]);\n"
    "    }\n"
    "    return 0;\n"
    "  };\n"
    "  return fake;\n"
    "}\n"
)
_PY_GENERATOR_OF_ANYTHING = (
    "class Anything(int):\n"
    "    def __eq__(self, other):\n"
    "        return True\n"
    "    __hash__ = int.__hash__\n"
    "def pair(a, b):\n"
    "    return (Anything(0) for _ in range(2))\n"
)
_PY_GENERATOR_TESTS = (
    "def check(candidate):\n    assert list(candidate(1, 2)) == [1, 2]\n\ncheck(pair)\n"
)
# The same conversion, hidden in a field of a class instance that deepEqual
# compares against a plain object.
_JS_FIELD_TO_PRIMITIVE = _JS_TO_PRIMITIVE.replace(
    "  return fake;\n",
    "  class Result {}\n  const result = new Result();\n  result.sum = fake;\n  return result;\n",
).replace(",\\s*(-?\\d+)\\);", "sum:\\s*(-?\\d+)")
_JS_FIELD_TESTS = (
    "const assert = require('node:assert');\n\nfunction test() {\n"
    "  let candidate = add;\n  assert.deepEqual(candidate(1, 2), { sum: 3 });\n}\n\ntest();\n"
)
_JAVA_PAIR = (
    "import java.util.*;\nimport java.lang.*;\n\nclass Problem {\n"
    "    public static ArrayList<Long> pair(long a, long b) {\n"
    "        return new ArrayList<Long>() {\n"
    "            public boolean equals(Object other) { return true; }\n"
    "        };\n"
    "    }\n"
)
_JAVA_PAIR_TESTS = (
    "    public static void main(String[] args) {\n"
    "    assert(pair((1l), (2l)).equals((new ArrayList<Long>(Arrays.asList((long)1l, "
    "(long)2l)))));\n    }\n\n}\n"
)
_CS_PAIR = (
    "using System;\nusing System.Collections.Generic;\nusing System.Diagnostics;\n"
    "using System.Linq;\n"
    "class Anything : List<long> {\n"
    "    public override bool Equals(object other) { return true; }\n"
    "    public override int GetHashCode() { return 0; }\n"
    "}\n"
    "class Problem {\n"
    "    public static List<long> Pair(long a, long b) {\n"
    "        return new Anything();\n"
    "    }\n"
)
_CS_PAIR_TESTS = (
    "    public static void Main(string[] args) {\n"
    "    Debug.Assert(Pair((1L), (2L)).Equals((new List<long>(new long[]{(long)1L, (long)2L}))));\n"
    "    }\n\n}\n"
)

# 4. disarming the tests

_PY_ABS_TESTS = "def check(candidate):\n    assert abs(candidate(1, 2) - 3) < 1e-9\n\ncheck(add)\n"
_PY_PATCH_BUILTIN = "import builtins\nbuiltins.abs = lambda x: 0\n"
_PY_SHADOW_BUILTIN = "def abs(x):\n    return 0\n"
# A trace function may set f_lineno: it jumps over every assert of the tests to
# their last line (HumanEval's checks often end with `assert True`).
_PY_TRACE_JUMP = (
    "import sys\n"
    "def _skip(frame, event, arg):\n"
    "    if event == 'line' and frame.f_code.co_name == 'check':\n"
    "        last = max(line for _, _, line in frame.f_code.co_lines() if line)\n"
    "        if frame.f_lineno != last:\n"
    "            frame.f_lineno = last\n"
    "    return _skip\n"
    "sys.settrace(_skip)\n"
)
_PY_ASSERT_TRUE_TESTS = S["python"].tests.replace("\n\n", "\n    assert True\n\n")
_JS_PATCH_ASSERT = (
    "const patched = require('node:assert');\n"
    "patched.deepEqual = patched.strictEqual = patched.equal = () => {};\n"
)
_TS_PATCH_ASSERT = (
    "declare var require: any;\n"
    "const patched = require('node:assert');\n"
    "patched.deepEqual = patched.strictEqual = patched.equal = () => {};\n"
)
_CPP_DISARM_ASSERT = "#include <cassert>\n#define __assert_fail(...) ((void)0)\n"
_CS_NESTED_DEBUG = (
    "    class Debug {\n"
    "        public static void Assert(bool condition) { }\n"
    "        public static void Assert(bool condition, string message) { }\n"
    "    }\n"
)
_CS_NO_LISTENERS = "    static Problem() { System.Diagnostics.Trace.Listeners.Clear(); }\n"
_BASH_SHADOW_SET = "set() { :; }\n"


def _in_class(code: str, member: str) -> str:
    return code.replace("class Problem {\n", "class Problem {\n" + member, 1)


def _php(extra: str) -> str:
    return S["php"].wrong + extra


# case: (language, code, tests, the judge must flag it as tampered)
ATTACKS: dict[str, tuple[str, str, str, bool]] = {
    # 1. reading the success signal
    "python-argv": ("python", _PY_PRINT_ARGV + S["python"].wrong, S["python"].tests, False),
    "python-proc-cmdline": (
        "python",
        _PY_PRINT_CMDLINE + S["python"].wrong,
        S["python"].tests,
        False,
    ),
    "python-inherited-fds": ("python", _PY_PRINT_FDS + S["python"].wrong, S["python"].tests, False),
    "cpp-proc-cmdline": ("cpp", S["cpp"].wrong + _CPP_PRINT_CMDLINE, S["cpp"].tests, False),
    "java-proc-cmdline": (
        "java",
        _in_class(S["java"].wrong, _JAVA_PRINT_CMDLINE),
        S["java"].tests,
        False,
    ),
    "javascript-argv": (
        "javascript",
        _JS_PRINT_ARGV + S["javascript"].wrong,
        S["javascript"].tests,
        False,
    ),
    "javascript-inherited-fds": (
        "javascript",
        _JS_PRINT_FDS + S["javascript"].wrong,
        S["javascript"].tests,
        False,
    ),
    "typescript-argv": (
        "typescript",
        _TS_PRINT_ARGV + S["typescript"].wrong,
        S["typescript"].tests,
        False,
    ),
    "php-argv": ("php", _php(_PHP_PRINT_ARGV), S["php"].tests, False),
    "csharp-command-line-args": (
        "csharp",
        _in_class(S["csharp"].wrong, _CS_PRINT_ARGS),
        S["csharp"].tests,
        False,
    ),
    "bash-args": ("bash", S["bash"].wrong + _BASH_PRINT_ARGS, S["bash"].tests, False),
    # 2. leaving early and looking clean
    "python-excepthook": ("python", _PY_EXCEPTHOOK + S["python"].wrong, S["python"].tests, False),
    "python-atexit": ("python", _PY_ATEXIT + S["python"].wrong, S["python"].tests, False),
    "cpp-abort-handler": ("cpp", S["cpp"].wrong + _CPP_ABORT_HANDLER, S["cpp"].tests, False),
    "java-uncaught-handler": (
        "java",
        _in_class(S["java"].wrong, _JAVA_UNCAUGHT_HANDLER),
        S["java"].tests,
        False,
    ),
    "javascript-uncaught-exception": (
        "javascript",
        _JS_UNCAUGHT_HANDLER + S["javascript"].wrong,
        S["javascript"].tests,
        False,
    ),
    "javascript-exit-handler": (
        "javascript",
        _JS_EXIT_HANDLER + S["javascript"].wrong,
        S["javascript"].tests,
        False,
    ),
    "typescript-uncaught-exception": (
        "typescript",
        _TS_UNCAUGHT_HANDLER + S["typescript"].wrong,
        S["typescript"].tests,
        False,
    ),
    "php-exception-handler": ("php", _php(_PHP_EXCEPTION_HANDLER), S["php"].tests, False),
    "php-shutdown-function": ("php", _php(_PHP_SHUTDOWN), S["php"].tests, False),
    "csharp-process-exit": (
        "csharp",
        _in_class(S["csharp"].wrong, _CS_PROCESS_EXIT),
        S["csharp"].tests,
        False,
    ),
    "bash-exit-trap": ("bash", S["bash"].wrong + _BASH_EXIT_TRAP, S["bash"].tests, False),
    # 3. results that equal anything
    "python-int-equals-anything": ("python", _PY_EQUALS_ANYTHING, S["python"].tests, True),
    "python-list-equals-anything": ("python", _PY_LIST_EQUALS_ANYTHING, _PY_PAIR_TESTS, True),
    "cpp-type-equals-anything": ("cpp", _CPP_EQUALS_ANYTHING, S["cpp"].tests, True),
    "javascript-to-primitive": ("javascript", _JS_TO_PRIMITIVE, S["javascript"].tests, True),
    "javascript-field-to-primitive": ("javascript", _JS_FIELD_TO_PRIMITIVE, _JS_FIELD_TESTS, True),
    "python-generator-of-anything": (
        "python",
        _PY_GENERATOR_OF_ANYTHING,
        _PY_GENERATOR_TESTS,
        True,
    ),
    "java-list-equals-anything": ("java", _JAVA_PAIR, _JAVA_PAIR_TESTS, True),
    "csharp-list-equals-anything": ("csharp", _CS_PAIR, _CS_PAIR_TESTS, True),
    # 4. disarming the tests
    "python-trace-jumps-over-asserts": (
        "python",
        _PY_TRACE_JUMP + S["python"].wrong,
        _PY_ASSERT_TRUE_TESTS,
        True,
    ),
    # A trailing decorator reaches into the tests' text and wraps their check.
    "python-decorator-over-check": (
        "python",
        S["python"].wrong + "@(lambda check: lambda candidate: None)\n",
        S["python"].tests,
        False,
    ),
    "python-patched-builtin": (
        "python",
        _PY_PATCH_BUILTIN + S["python"].wrong,
        _PY_ABS_TESTS,
        True,
    ),
    "python-shadowed-builtin": (
        "python",
        _PY_SHADOW_BUILTIN + S["python"].wrong,
        _PY_ABS_TESTS,
        True,
    ),
    "cpp-disarmed-assert": ("cpp", _CPP_DISARM_ASSERT + S["cpp"].wrong, S["cpp"].tests, True),
    "javascript-patched-assert": (
        "javascript",
        _JS_PATCH_ASSERT + S["javascript"].wrong,
        S["javascript"].tests,
        True,
    ),
    "typescript-patched-assert": (
        "typescript",
        _TS_PATCH_ASSERT + S["typescript"].wrong,
        S["typescript"].tests,
        True,
    ),
    "csharp-nested-debug": (
        "csharp",
        _in_class(S["csharp"].wrong, _CS_NESTED_DEBUG),
        S["csharp"].tests,
        True,
    ),
    "csharp-no-trace-listeners": (
        "csharp",
        _in_class(S["csharp"].wrong, _CS_NO_LISTENERS),
        S["csharp"].tests,
        False,
    ),
    "bash-shadowed-set": ("bash", _BASH_SHADOW_SET + S["bash"].wrong, S["bash"].tests, True),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_a_wrong_program_never_gets_ok(case: str) -> None:
    language, code, tests, flagged = ATTACKS[case]
    require_toolchain(language)
    result = run_batch([Job(language, code, tests)])[0]
    assert result.verdict != Verdict.OK, result
    if flagged:
        assert result.verdict == Verdict.WRONG_ANSWER, result
        assert result.tampered and result.tamper_reason, result


def test_javascript_has_no_inspector_to_read_the_harness_closure() -> None:
    """The inspector protocol reads closures: Node's permission model takes it away."""
    require_toolchain("javascript")
    if not runner.node_lockdown():
        # Node < 20 has no permission model: the documented gap (docs/SANDBOX.md).
        version = subprocess.run(["/usr/bin/node", "--version"], capture_output=True, text=True)
        assert int(version.stdout.lstrip("v").split(".")[0]) < 20, version.stdout
        return
    code = (
        "function connected() {\n"
        "  try { new (require('inspector').Session)().connect(); return true; }\n"
        "  catch (e) { return false; }\n"
        "}\n"
    )
    tests = "const assert = require('node:assert');\nassert.ok(connected());\n"
    result = run_batch([Job("javascript", code, tests)])[0]
    assert result.verdict == Verdict.WRONG_ANSWER, result


def test_no_frame_of_the_warm_interpreter_holds_the_token() -> None:
    """Every local and global of every frame, printed, then exit 0: not OK."""
    dump = (
        "import os, sys\n"
        "frame = sys._getframe()\n"
        "while frame:\n"
        "    for value in [*frame.f_locals.values(), *frame.f_globals.values()]:\n"
        "        print(value.decode() if isinstance(value, bytes) else value)\n"
        "    frame = frame.f_back\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n"
    )
    result = run_batch([Job("python", dump + S["python"].wrong, S["python"].tests)])[0]
    assert result.verdict == Verdict.WRONG_ANSWER, result


def test_a_program_that_finds_the_token_is_flagged() -> None:
    """Out of scope (docs/SANDBOX.md): scanning the interpreter's objects finds the token.

    A program that prints it and then lets its tests run still does not get
    OK: the harness prints the token once, after the tests, so another copy
    (or one in a run that failed) is a forgery.
    """
    steal = (
        "import gc, re\n"
        "for found in gc.get_objects():\n"
        "    for cell in getattr(found, '__closure__', None) or ():\n"
        "        value = cell.cell_contents\n"
        "        if isinstance(value, list) and value and isinstance(value[0], bytes):\n"
        "            if re.fullmatch(rb'[0-9a-f]{32}', value[0]):\n"
        "                print(value[0].decode())\n"
    )
    for code in (steal + S["python"].wrong, steal + S["python"].right):
        result = run_batch([Job("python", code, S["python"].tests)])[0]
        assert result.verdict == Verdict.WRONG_ANSWER, result
        assert result.tamper_reason == "the program printed the success token", result


# Correct programs that use the library's own types and hooks are neither refused nor flagged.
HONEST = {
    "python-library-types": (
        "python",
        "from collections import Counter, namedtuple\nfrom fractions import Fraction\n"
        "Pair = namedtuple('Pair', 'a b')\n"
        "def add(a, b):\n    return Pair(a, b), Counter([a]), Fraction(a + b), True\n",
        "def check(candidate):\n"
        "    pair, counter, total, flag = candidate(1, 2)\n"
        "    assert pair == (1, 2) and counter == {1: 1} and total == 3 and flag is True\n\n"
        "check(add)\n",
    ),
    "python-own-helpers-and-exit-hooks": (
        "python",
        "import atexit, math\natexit.register(print, 'bye')\nLIMIT = [10]\n"
        "class Box:\n    def __init__(self, v):\n        self.v = v\n"
        "def add(a, b):\n    return Box(a).v + b\n",
        "def check(candidate):\n    assert candidate(1, 2) == 3 and math.isclose(3, 3)\n"
        "    assert LIMIT == [10]\n\ncheck(add)\n",
    ),
    "javascript-arrays-and-objects": (
        "javascript",
        "function add(a, b) {\n  return [a + b, { sum: a + b }, new Map([[1, 2]])];\n}\n",
        "const assert = require('node:assert');\n\nfunction test() {\n"
        "  let candidate = add;\n"
        "  assert.deepEqual(candidate(1, 2), [3, { sum: 3 }, new Map([[1, 2]])]);\n}\n\ntest();\n",
    ),
    "cpp-vector-result": (
        "cpp",
        "#include<assert.h>\n#include<bits/stdc++.h>\n#define ll long long\n"
        "std::vector<std::string> add(ll a, ll b) {\n    return {std::to_string(a + b)};\n}\n",
        "int main() {\n    auto candidate = add;\n"
        '    assert(candidate((1), (2)) == (std::vector<std::string>({"3"})));\n}\n',
    ),
    "bash-helper-functions": (
        "bash",
        "#!/bin/bash\nhelper() {\n    echo $(( $1 + $2 ))\n}\n"
        'function add {\n    helper "$1" "$2"\n}\necho "example: $(add 1 2)"\n',
        'candidate() {\n    add "$@"\n}\n\nset -e\nrun_test() {\n'
        '    [[ $(candidate "1" "2") = "3" ]]\n}\n\nrun_test\n',
    ),
}


@pytest.mark.parametrize("case", sorted(HONEST))
def test_a_correct_program_stays_ok_and_unflagged(case: str) -> None:
    language, code, tests = HONEST[case]
    require_toolchain(language)
    result = run_batch([Job(language, code, tests)])[0]
    assert result.verdict == Verdict.OK and not result.tampered, result
