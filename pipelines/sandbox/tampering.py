"""Tampering the judge can see in a C++ program's text before compiling it.

The C++ tests are compiled in the candidate's translation unit, after its
code, so a macro of the candidate's can rewrite them: `#define __assert_fail`
empties every assert, `#define candidate ...` replaces the entry point.  Any
`#define` or `#undef` of a name the tests or the harness's prologue use, or of
a reserved name, is refused; so are the pragmas that save and restore macros,
and a free `operator==`/`operator!=` on standard types, which would win
overload resolution over the standard one in the tests' comparisons.
"""

import re

from models.enums import Language
from pipelines.sandbox.languages import Recipe

_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(define|undef)[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
_MACRO_PRAGMA = re.compile(r"push_macro|pop_macro|_Pragma")
_STD_EQUALITY = re.compile(r"operator\s*(==|!=)\s*\(\s*(const\s+)?(::\s*)?std\s*::")
# Redefining these changes the tests' types, never what they compare.
_HARMLESS = {"int", "long", "short", "char", "unsigned", "signed", "float", "double", "NDEBUG"}


def cpp_macro_tampering(recipe: Recipe, code: str, tests: str) -> str | None:
    """Why the candidate's C++ code tampers with the tests' text, or None."""
    if recipe.language != Language.CPP:
        return None
    # Line splices and the `%:` digraph are other spellings of the same directive.
    text = code.replace("\\\n", "").replace("%:", "#")
    guarded = set(_IDENTIFIER.findall(tests)) | set(_IDENTIFIER.findall(recipe.prologue))
    for kind, name in _DIRECTIVE.findall(text):
        reserved = name.startswith("__") or re.match(r"_[A-Z]", name) or name.startswith("rr_")
        if name not in _HARMLESS and (name in guarded or reserved):
            return f"the program's code has #{kind} {name}, a name the tests or the harness use"
    if _MACRO_PRAGMA.search(text):
        return "the program's code saves or restores macros with a pragma"
    if _STD_EQUALITY.search(text):
        return "the program's code defines operator== or != on standard types"
    return None
