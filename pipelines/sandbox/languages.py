"""Per-language recipes: file names, compile and run commands, and the test harness.

Paths are those the program sees: /src holds the program source (read-only),
/build the compiled artefacts, /job is the writable working folder.  In
insecure mode the runner substitutes host folders for these prefixes.

In test mode the harness appended after `code + "\\n" + tests` prints the run's
random token (passed as the last argument) once the test code has returned
normally.  An early exit, by any route, never reaches that line.
"""

import re
from dataclasses import dataclass, replace

from models.enums import Language

SRC, BUILD, JOB = "/src", "/build", "/job"
TYPESCRIPT_DIR = "/opt/typescript"
_JVM_FLAGS = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Xshare:auto"]


@dataclass(frozen=True)
class Recipe:
    language: Language
    source_name: str
    compile: tuple[str, ...] | None
    run: tuple[str, ...]
    prologue: str
    epilogue: str
    # Text in the output of a failed test assertion: that failure is WRONG_ANSWER.
    assertion_markers: tuple[str, ...]
    # The exit status the test conventions use for a failed check (bash's `set -e`).
    assertion_exit_status: int | None = None
    max_pids: int = 128


_PY_EPILOGUE = (
    "\nimport sys as _rr_sys\n"
    "_rr_sys.stdout.flush()\n"
    '_rr_sys.stdout.write("\\n" + _rr_sys.argv[-1] + "\\n")\n'
)
# `#undef NDEBUG` + re-including <cassert> restores a real assert even if the
# candidate defined NDEBUG or its own `assert` macro.  The tests' `main` is
# renamed so our `main` can print the token after it returns.
_CPP_PROLOGUE = (
    "\n#undef NDEBUG\n#include <cassert>\n#include <cstdio>\n#include <iostream>\n"
    "#define main rr_tests_main\n"
)
_CPP_EPILOGUE = (
    "\n#undef main\n"
    "int main(int argc, char** argv) {\n"
    "    rr_tests_main();\n"
    "    std::cout.flush();\n"
    "    std::fflush(stdout);\n"
    '    std::printf("\\n%s\\n", argv[argc - 1]);\n'
    "    return 0;\n"
    "}\n"
)
_JAVA_EPILOGUE = (
    "\nclass RRHarness {\n"
    "    public static void main(String[] args) throws Throwable {\n"
    "        Problem.main(new String[0]);\n"
    "        System.out.flush();\n"
    '        System.out.print("\\n" + args[args.length - 1] + "\\n");\n'
    "        System.out.flush();\n"
    "    }\n"
    "}\n"
)
_JS_EPILOGUE = '\nprocess.stdout.write("\\n" + process.argv[process.argv.length - 1] + "\\n");\n'
_TS_EPILOGUE = (
    "\nconst rrProcess = (globalThis as any).process;\n"
    'rrProcess.stdout.write("\\n" + rrProcess.argv[rrProcess.argv.length - 1] + "\\n");\n'
)
_PHP_EPILOGUE = '\necho "\\n" . $argv[count($argv) - 1] . "\\n";\n'
# A global `Debug` class wins name lookup over `using System.Diagnostics`, so the
# tests' Debug.Assert calls land here and throw, whatever trace listeners the
# candidate installs or removes.
_CS_EPILOGUE = (
    "\nclass Debug {\n"
    "    public static void Assert(bool condition) {\n"
    '        if (!condition) throw new System.Exception("RR assertion failed");\n'
    "    }\n"
    "    public static void Assert(bool condition, string message) {\n"
    '        if (!condition) throw new System.Exception("RR assertion failed: " + message);\n'
    "    }\n"
    "}\n"
    "class RRHarness {\n"
    "    static int Main(string[] args) {\n"
    "        var flags = System.Reflection.BindingFlags.Static\n"
    "            | System.Reflection.BindingFlags.Public\n"
    "            | System.Reflection.BindingFlags.NonPublic;\n"
    '        var tests = typeof(Problem).GetMethod("Main", flags);\n'
    "        try {\n"
    "            tests.Invoke(null, tests.GetParameters().Length == 0\n"
    "                ? null : new object[] { new string[0] });\n"
    "        } catch (System.Reflection.TargetInvocationException e) {\n"
    "            System.Console.Error.WriteLine(e.InnerException);\n"
    "            return 1;\n"
    "        }\n"
    "        System.Console.Out.Flush();\n"
    '        System.Console.Write("\\n" + args[args.Length - 1] + "\\n");\n'
    "        System.Console.Out.Flush();\n"
    "        return 0;\n"
    "    }\n"
    "}\n"
)
_BASH_EPILOGUE = "\nprintf '\\n%s\\n' \"${@: -1}\"\n"

RECIPES: dict[Language, Recipe] = {
    Language.PYTHON: Recipe(
        Language.PYTHON,
        "prog.py",
        None,
        ("/usr/bin/python3", f"{SRC}/prog.py"),
        "",
        _PY_EPILOGUE,
        ("AssertionError",),
    ),
    Language.CPP: Recipe(
        Language.CPP,
        "prog.cpp",
        ("/usr/bin/g++", "-std=c++17", "-O0", "-o", f"{BUILD}/prog", f"{SRC}/prog.cpp"),
        (f"{BUILD}/prog",),
        _CPP_PROLOGUE,
        _CPP_EPILOGUE,
        ("Assertion `", "Assertion '"),
    ),
    Language.JAVA: Recipe(
        Language.JAVA,
        "Problem.java",
        (
            "/usr/bin/javac",
            *(f"-J{flag}" for flag in _JVM_FLAGS),
            "-encoding",
            "UTF-8",
            "-nowarn",
            "-d",
            BUILD,
            f"{SRC}/Problem.java",
        ),
        ("/usr/bin/java", "-ea", *_JVM_FLAGS, "-cp", BUILD, "RRHarness"),
        "",
        _JAVA_EPILOGUE,
        ("java.lang.AssertionError",),
        max_pids=256,
    ),
    Language.JAVASCRIPT: Recipe(
        Language.JAVASCRIPT,
        "prog.js",
        None,
        ("/usr/bin/node", f"{SRC}/prog.js"),
        "",
        _JS_EPILOGUE,
        ("AssertionError",),
    ),
    Language.TYPESCRIPT: Recipe(
        Language.TYPESCRIPT,
        "prog.ts",
        (
            "/usr/bin/node",
            f"{TYPESCRIPT_DIR}/bin/tsc",
            "--target",
            "es2020",
            "--module",
            "commonjs",
            "--noEmitOnError",
            # Type-checking the bundled lib .d.ts files is most of tsc's time and
            # tells nothing about the candidate.
            "--skipLibCheck",
            "--pretty",
            "false",
            "--outDir",
            BUILD,
            f"{SRC}/prog.ts",
        ),
        ("/usr/bin/node", f"{BUILD}/prog.js"),
        "",
        _TS_EPILOGUE,
        ("AssertionError",),
    ),
    Language.PHP: Recipe(
        Language.PHP,
        "prog.php",
        None,
        (
            "/usr/bin/php",
            "-d",
            "display_errors=0",
            "-d",
            "log_errors=1",
            "-d",
            "memory_limit=-1",
            f"{SRC}/prog.php",
        ),
        "",
        _PHP_EPILOGUE,
        ("Test failed!",),
    ),
    Language.CSHARP: Recipe(
        Language.CSHARP,
        "prog.cs",
        (
            "/usr/bin/mcs",
            "-d:DEBUG",
            "-main:RRHarness",
            "-r:System.Numerics.dll",
            f"-out:{BUILD}/prog.exe",
            f"{SRC}/prog.cs",
        ),
        ("/usr/bin/mono", f"{BUILD}/prog.exe"),
        "",
        _CS_EPILOGUE,
        ("RR assertion failed",),
    ),
    Language.BASH: Recipe(
        Language.BASH,
        "prog.sh",
        None,
        ("/bin/bash", f"{SRC}/prog.sh"),
        "",
        _BASH_EPILOGUE,
        (),
        assertion_exit_status=1,
    ),
}


def recipe_for(language: str) -> Recipe:
    """The recipe of `language`; ValueError naming the supported ones otherwise."""
    try:
        return RECIPES[Language(language)]
    except ValueError:
        supported = ", ".join(lang.value for lang in RECIPES)
        raise ValueError(f"unsupported language {language!r}; supported: {supported}") from None


def program_text(recipe: Recipe, code: str, tests: str, *, with_harness: bool) -> str:
    """The program: candidate code, then the tests, then (test mode) the token harness."""
    if not with_harness:
        return code + "\n" + tests
    return code + "\n" + recipe.prologue + tests + recipe.epilogue


def io_mode_recipe(recipe: Recipe, program: str) -> Recipe:
    """The recipe for stdin/stdout programs, which run without the test harness."""
    if recipe.language == Language.CPP:
        # Competitive programs are judged on speed; test mode keeps -O0 because the
        # renamed test `main` may flow off its end, which -O2 turns into a crash.
        assert recipe.compile is not None
        compile_argv = tuple("-O2" if arg == "-O0" else arg for arg in recipe.compile)
        return replace(recipe, compile=compile_argv)
    if recipe.language == Language.JAVA:
        # A stand-alone Java program names its own main class; the file must match it.
        match = re.search(r"public\s+(?:final\s+)?class\s+(\w+)", program)
        main_class = match.group(1) if match else "Main"
        assert recipe.compile is not None
        source = f"{main_class}.java"
        compile_argv = (*recipe.compile[:-1], f"{SRC}/{source}")
        return replace(
            recipe, source_name=source, compile=compile_argv, run=(*recipe.run[:-1], main_class)
        )
    if recipe.language == Language.CSHARP:
        assert recipe.compile is not None
        compile_argv = tuple(arg for arg in recipe.compile if not arg.startswith("-main:"))
        return replace(recipe, compile=compile_argv)
    return recipe
