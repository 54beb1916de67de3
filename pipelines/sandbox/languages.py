"""Per-language recipes: file names, compile and run commands, and the test harness.

Paths are those the program sees: /src holds the program source (read-only),
/build the compiled artefacts, /job is the writable working folder.  In
insecure mode the runner substitutes host folders for these prefixes.

In test mode a judge's harness runs the tests and prints a per-run secret once
they have returned normally.  The secret comes on a pipe (its descriptor number
is the last argument) that the harness reads to its end before any candidate
code runs; it is never in the command line, the environment or a file, and it
is kept where candidate code cannot name it (docs/SANDBOX.md has the threat
model).  An early exit, by any route, never reaches the line that prints it.
"""

import re
from dataclasses import dataclass, replace

from models.enums import Language

SRC, BUILD, JOB = "/src", "/build", "/job"
TYPESCRIPT_DIR = "/opt/typescript"
_PHP = ("/usr/bin/php", "-d", "display_errors=0", "-d", "log_errors=1", "-d", "memory_limit=-1")
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
    # Test mode runs this instead of `run` (the harness that loads the program).
    test_run: tuple[str, ...] | None = None
    # Test mode only: harness sources compiled with the program (C++).
    harness_sources: tuple[str, ...] = ()


# Where the judge's harness files (pipelines/sandbox/harness/) are bound.
HARNESS = "/rr"
# Written between the candidate's code and the tests; the harness splits the
# program at its last occurrence, so text in the candidate cannot move the split.
TESTS_MARKER = {
    Language.JAVASCRIPT: '\nvoid "rr-tests-begin";\n',
    Language.TYPESCRIPT: '\nvoid "rr-tests-begin";\n',
    Language.PHP: "\n/* rr-tests-begin */\n",
    Language.BASH: "\n# rr-tests-begin\n",
}
TAMPER_MARKER = "rr-tampered: "
# The exit status of a program that did not parse (the zygote's, and the
# JavaScript and bash harnesses', which check the syntax before running anything).
COMPILE_ERROR_STATUS = 97
# Stdin/stdout programs run without a harness: their syntax is checked by a
# compile step, cached like any compile.  (In test mode the harness checks it
# in the same sandbox, which costs no extra start.)
SYNTAX_CHECK = {
    Language.JAVASCRIPT: ("/usr/bin/node", "--check", f"{SRC}/prog.js"),
    Language.BASH: ("/bin/bash", "-n", f"{SRC}/prog.sh"),
}

# `#undef NDEBUG` + re-including <cassert> restores a real assert even if the
# candidate defined NDEBUG or its own `assert` macro.  The tests' `main` is
# renamed; harness/harness.cpp's `main` calls it and then prints the secret.
# `rr_harness::checked` refuses, at compile time, an entry point whose result
# type is not plain data (a type of the candidate's could compare equal to anything).
_CPP_PROLOGUE = """
#undef NDEBUG
#include <cassert>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
namespace rr_harness {
template <class T> struct plain : std::is_arithmetic<T> {};
template <> struct plain<std::string> : std::true_type {};
template <class T> struct plain<std::vector<T>> : plain<T> {};
template <class T> struct plain<std::optional<T>> : plain<T> {};
template <class T> struct plain<std::set<T>> : plain<T> {};
template <class K, class V>
struct plain<std::map<K, V>> : std::integral_constant<bool, plain<K>::value && plain<V>::value> {};
template <class A, class B>
struct plain<std::pair<A, B>> : std::integral_constant<bool, plain<A>::value && plain<B>::value> {};
template <class... T>
struct plain<std::tuple<T...>> : std::integral_constant<bool, (plain<T>::value && ...)> {};
template <class R, class... A> auto checked(R (*entry)(A...)) -> R (*)(A...) {
    static_assert(plain<std::remove_cv_t<R>>::value,
                  "rr-tampered: the entry point's result type is not plain data");
    return entry;
}
}  // namespace rr_harness
void rr_flush_streams() {
    std::cout.flush();
    std::fflush(stdout);
}
#define main rr_tests_main
"""
_CPP_ENTRY = re.compile(r"\bauto\s+candidate\s*=\s*([A-Za-z_]\w*)\s*;")
_JAVA_EPILOGUE = """
class RRHarness {
    public static void main(String[] args) throws Throwable {
        // The secret arrives on a pipe that this reads to its end before any
        // class of the candidate's is initialised; it lives only in this frame.
        String secret;
        String fd = args[args.length - 1];
        try (java.io.BufferedReader in = new java.io.BufferedReader(
                new java.io.FileReader("/proc/self/fd/" + fd))) {
            secret = in.readLine().trim();
            while (in.read() >= 0) { }  // to its end: a later reader finds nothing
        }
        String tampered = equalsOverride();
        if (tampered != null) {
            System.err.println("rr-tampered: " + tampered);
            System.exit(1);
        }
        Problem.main(new String[0]);
        System.out.flush();
        System.out.print("\\n" + secret + "\\n");
        System.out.flush();
    }

    // A class of the candidate's that overrides equals could compare equal to
    // any expected value; records keep their generated equals.
    static String equalsOverride() throws Exception {
        java.io.File folder = new java.io.File(
            RRHarness.class.getProtectionDomain().getCodeSource().getLocation().toURI());
        ClassLoader loader = RRHarness.class.getClassLoader();
        for (String file : folder.list()) {
            if (!file.endsWith(".class") || file.equals("RRHarness.class")) continue;
            Class<?> type = Class.forName(file.substring(0, file.length() - 6), false, loader);
            if (type.isRecord()) continue;
            try {
                type.getDeclaredMethod("equals", Object.class);
                return "class " + type.getName() + " overrides equals";
            } catch (NoSuchMethodException e) {
                // not overridden
            }
        }
        return null;
    }
}
"""
# A global `Debug` class wins name lookup over `using System.Diagnostics`, so the
# tests' Debug.Assert calls land here and throw, whatever trace listeners the
# candidate installs or removes.
_CS_EPILOGUE = """
class Debug {
    public static void Assert(bool condition) {
        if (!condition) throw new System.Exception("RR assertion failed");
    }
    public static void Assert(bool condition, string message) {
        if (!condition) throw new System.Exception("RR assertion failed: " + message);
    }
}
class RRHarness {
    static int Main(string[] args) {
        // The secret arrives on a pipe read to its end before any type of the
        // candidate's is touched; it lives only in this frame.
        string secret = System.IO.File.ReadAllText("/proc/self/fd/" + args[args.Length - 1]).Trim();
        string tampered = Tampering();
        if (tampered != null) {
            System.Console.Error.WriteLine("rr-tampered: " + tampered);
            return 1;
        }
        var flags = System.Reflection.BindingFlags.Static
            | System.Reflection.BindingFlags.Public
            | System.Reflection.BindingFlags.NonPublic;
        var tests = typeof(Problem).GetMethod("Main", flags);
        try {
            tests.Invoke(null, tests.GetParameters().Length == 0
                ? null : new object[] { new string[0] });
        } catch (System.Reflection.TargetInvocationException e) {
            System.Console.Error.WriteLine(e.InnerException);
            return 1;
        }
        System.Console.Out.Flush();
        System.Console.Write("\\n" + secret + "\\n");
        System.Console.Out.Flush();
        return 0;
    }

    // A nested Debug class would take the tests' Debug.Assert calls; a type with
    // its own Equals or == could compare equal to any expected value.
    static string Tampering() {
        var declared = System.Reflection.BindingFlags.DeclaredOnly
            | System.Reflection.BindingFlags.Public
            | System.Reflection.BindingFlags.NonPublic
            | System.Reflection.BindingFlags.Instance
            | System.Reflection.BindingFlags.Static;
        foreach (var type in typeof(RRHarness).Assembly.GetTypes()) {
            if (type == typeof(RRHarness) || type == typeof(Debug)) continue;
            if (type.Name.Contains("<")) continue;  // made by the compiler
            if (type.Name == "Debug") return "the program declares its own Debug class";
            foreach (var method in type.GetMethods(declared)) {
                var parameters = method.GetParameters();
                bool equals = method.Name == "Equals" && parameters.Length == 1
                    && parameters[0].ParameterType == typeof(object);
                if (equals || method.Name == "op_Equality" || method.Name == "op_Inequality")
                    return "type " + type.FullName + " defines " + method.Name;
            }
        }
        return null;
    }
}
"""
RECIPES: dict[Language, Recipe] = {
    Language.PYTHON: Recipe(
        Language.PYTHON,
        "prog.py",
        None,
        ("/usr/bin/python3", f"{SRC}/prog.py"),
        "",
        "",
        ("AssertionError",),
    ),
    Language.CPP: Recipe(
        Language.CPP,
        "prog.cpp",
        ("/usr/bin/g++", "-std=c++17", "-O0", "-o", f"{BUILD}/prog", f"{SRC}/prog.cpp"),
        (f"{BUILD}/prog",),
        _CPP_PROLOGUE,
        "",
        ("Assertion `", "Assertion '"),
        # Linked first, so its .preinit_array entry takes the secret before the
        # candidate's constructors (or its own .preinit_array entries) run.
        harness_sources=(f"{HARNESS}/harness.cpp",),
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
        TESTS_MARKER[Language.JAVASCRIPT],
        "",
        ("AssertionError",),
        test_run=("/usr/bin/node", f"{HARNESS}/harness.js", f"{SRC}/prog.js"),
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
        TESTS_MARKER[Language.TYPESCRIPT],
        "",
        ("AssertionError",),
        test_run=("/usr/bin/node", f"{HARNESS}/harness.js", f"{BUILD}/prog.js"),
    ),
    Language.PHP: Recipe(
        Language.PHP,
        "prog.php",
        None,
        (*_PHP, f"{SRC}/prog.php"),
        TESTS_MARKER[Language.PHP],
        "",
        ("Test failed!",),
        test_run=(*_PHP, f"{HARNESS}/harness.php", f"{SRC}/prog.php"),
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
        TESTS_MARKER[Language.BASH],
        "",
        (),
        assertion_exit_status=1,
        test_run=("/bin/bash", f"{HARNESS}/harness.sh", f"{SRC}/prog.sh"),
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
    """The program: candidate code, then the tests, with the harness's parts in test mode."""
    if not with_harness:
        return code + "\n" + tests
    if recipe.language == Language.CPP:
        tests = _CPP_ENTRY.sub(r"auto candidate = rr_harness::checked(\1);", tests)
    return code + "\n" + recipe.prologue + tests + recipe.epilogue


def test_mode_recipe(recipe: Recipe) -> Recipe:
    """The recipe for a test-mode run: the harness's command, its sources compiled in."""
    if recipe.harness_sources:
        assert recipe.compile is not None
        sources = recipe.harness_sources
        compile_argv = (*recipe.compile[:-1], *sources, recipe.compile[-1])
        recipe = replace(recipe, compile=compile_argv)
    if recipe.test_run:
        recipe = replace(recipe, run=recipe.test_run)
    return recipe


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
    if recipe.language in SYNTAX_CHECK:
        return replace(recipe, compile=SYNTAX_CHECK[recipe.language])
    if recipe.language == Language.CSHARP:
        assert recipe.compile is not None
        compile_argv = tuple(arg for arg in recipe.compile if not arg.startswith("-main:"))
        return replace(recipe, compile=compile_argv)
    return recipe
