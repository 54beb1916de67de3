"""The mutation engine: near-miss variants of a reference solution, with no model.

Single (then double) semantic mutations (a flipped comparison, an off-by-one
bound, a negated condition, a wrong return value...) in a seeded random order,
distinct from each other and from the reference. Python mutations come from the
AST, the other languages' from their tokens; both are text edits, so everything
else in the program keeps its layout and comments.
"""

import ast
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

from models.enums import Language

Edit = tuple[int, int, str]  # replace text[start:end] with the string


def mutants(
    reference: str, language: Language, n: int, *, seed: str, floor: int = 0, problem_id: int = 0
) -> list[str]:
    """Up to `n` distinct mutants of `reference`, none the same program as it. Edits
    start at or after `floor` when any do (mutations stay after a prompt the
    reference starts with, like a model's completion would)."""
    if language == Language.PYTHON:
        edits, same_program = python_edits(reference, problem_id), _python_key
    else:
        edits, same_program = token_edits(reference, language), _token_key
    edits = [edit for edit in edits if edit[0] >= floor] or edits
    rng = random.Random(seed)
    rng.shuffle(edits)
    seen = {same_program(reference)}
    found = []
    for combo in _edit_combinations(edits, rng):
        code = apply_edits(reference, combo)
        key = same_program(code)
        if key is None or key in seen:
            continue
        seen.add(key)
        found.append(code)
        if len(found) == n:
            break
    return found


def _edit_combinations(edits: list[Edit], rng: random.Random) -> Iterator[list[Edit]]:
    """Every single edit, then pairs of non-overlapping ones (bounded)."""
    yield from ([edit] for edit in edits)
    pairs = [
        (a, b) for k, a in enumerate(edits) for b in edits[k + 1 :] if a[1] <= b[0] or b[1] <= a[0]
    ]
    rng.shuffle(pairs)
    yield from (list(pair) for pair in pairs[:2000])


def apply_edits(text: str, edits: Sequence[Edit]) -> str:
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _python_key(code: str) -> str | None:
    """Programs that differ only in parentheses or layout are the same program."""
    try:
        return ast.dump(ast.parse(code))
    except SyntaxError:
        return None


def _token_key(code: str) -> str:
    return " ".join(code.split())


# Python: the AST finds each site; its source segment is replaced by the
# unparsed mutated node, so everything else keeps its layout and comments.
_PY_BINOPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.FloorDiv, ast.Add),
    ast.FloorDiv: (ast.Mult, ast.Div),
    ast.Div: (ast.Mult, ast.FloorDiv),
    ast.Mod: (ast.FloorDiv,),
}
_PY_COMPARES: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE, ast.Gt),
    ast.LtE: (ast.Lt, ast.GtE),
    ast.Gt: (ast.GtE, ast.Lt),
    ast.GtE: (ast.Gt, ast.LtE),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}


def python_edits(source: str, problem_id: int = 0) -> list[Edit]:
    """All single semantic mutations of a Python program, as text edits."""
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ValueError(
            f"problem {problem_id}: reference solution is not valid Python: {error}"
        ) from None
    offsets = _line_offsets(source)
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    edits: list[Edit] = []
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue
        for mutated in _python_mutations(node):
            start, end = _span(node, offsets, source)
            edits.append((start, end, f"({ast.unparse(mutated)})"))
        # Negated conditions and wrong return values replace a child's span.
        tests = [node.test] if isinstance(node, ast.If | ast.While | ast.IfExp) else []
        tests += node.ifs if isinstance(node, ast.comprehension) else []
        for test in tests:
            start, end = _span(test, offsets, source)
            edits.append((start, end, f"(not ({source[start:end]}))"))
        if isinstance(node, ast.Return) and node.value is not None:
            start, end = _span(node.value, offsets, source)
            edits.append((start, end, "None"))
    return edits


def _python_mutations(node: ast.AST) -> list[ast.AST]:
    """Mutated copies of one expression node."""
    copy = _shallow_copy
    if isinstance(node, ast.BinOp) and type(node.op) in _PY_BINOPS:
        return [copy(node, op=op()) for op in _PY_BINOPS[type(node.op)]]
    if isinstance(node, ast.Compare):
        return [
            copy(node, ops=node.ops[:k] + [op()] + node.ops[k + 1 :])
            for k, current in enumerate(node.ops)
            for op in _PY_COMPARES.get(type(current), ())
        ]
    if isinstance(node, ast.BoolOp):
        return [copy(node, op=ast.Or() if isinstance(node.op, ast.And) else ast.And())]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return [node.operand]  # drop the negation
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        return [ast.Constant(not node.value)]
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return [ast.Constant(node.value + 1), ast.Constant(node.value - 1)]
    if isinstance(node, ast.Constant) and type(node.value) is str:
        return [ast.Constant(" " if node.value == "" else "")]
    if isinstance(node, ast.Name | ast.Attribute) and _swapped_name(node):
        return [_swapped_name(node)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len":
        # Off-by-one on a length, the classic boundary slip.
        return [ast.BinOp(left=node, op=op, right=ast.Constant(1)) for op in (ast.Add(), ast.Sub())]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        return _range_bound_mutations(node)
    return []


# Builtins and methods with a near-opposite twin (min for max, upper for lower).
_NAME_TWINS = {
    "min": "max",
    "max": "min",
    "any": "all",
    "all": "any",
    "lower": "upper",
    "upper": "lower",
    "islower": "isupper",
    "isupper": "islower",
    "startswith": "endswith",
    "endswith": "startswith",
    "floor": "ceil",
    "ceil": "floor",
}


def _swapped_name(node: ast.Name | ast.Attribute) -> ast.AST | None:
    if isinstance(node, ast.Name) and node.id in _NAME_TWINS:
        return ast.Name(id=_NAME_TWINS[node.id], ctx=node.ctx)
    if isinstance(node, ast.Attribute) and node.attr in _NAME_TWINS:
        return _shallow_copy(node, attr=_NAME_TWINS[node.attr])
    return None


def _range_bound_mutations(call: ast.Call) -> list[ast.AST]:
    """Off-by-one on the non-constant bounds of range() (constants mutate on their own)."""
    mutations = []
    for k, arg in enumerate(call.args[:2]):
        if isinstance(arg, ast.Constant):
            continue
        for op in (ast.Add(), ast.Sub()):
            bound = ast.BinOp(left=arg, op=op, right=ast.Constant(1))
            mutations.append(_shallow_copy(call, args=call.args[:k] + [bound] + call.args[k + 1 :]))
    return mutations


def _shallow_copy(node: ast.AST, **changes: Any) -> ast.AST:
    fields = {name: getattr(node, name) for name in node._fields} | changes
    return type(node)(**fields)


def _line_offsets(source: str) -> list[int]:
    """Character offset of each line start (ast columns are UTF-8 byte offsets)."""
    offsets, total = [], 0
    for line in source.splitlines(keepends=True):
        offsets.append(total)
        total += len(line)
    return offsets + [total]


def _span(node: ast.AST, offsets: list[int], source: str) -> tuple[int, int]:
    def position(lineno: int, col: int) -> int:
        line = source[offsets[lineno - 1] : offsets[lineno]]
        return offsets[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    return position(node.lineno, node.col_offset), position(node.end_lineno, node.end_col_offset)


# Other languages: a small tokenizer keeps strings and comments out of reach;
# operators mutate only where their spacing marks them as binary (` < ` is a
# comparison, `vector<int>` is not; ` - ` is subtraction, `-1` is not).
_TOKEN = re.compile(
    r"""(?P<skip>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`"""
    r"""|//[^\n]*|/\*.*?\*/|\#[^\n]*)"""  # '#': Bash/PHP comment, C++/C# directive
    r"""|(?P<number>\b\d+\.\d+\b|\b\d+[lLuU]*\b)"""
    r"""|(?P<word>-(?:lt|le|gt|ge|eq|ne)\b|[A-Za-z_]\w*)"""
    r"""|(?P<op>===|!==|==|!=|<=|>=|&&|\|\||->|=>|::|\+\+|--|[-+*/%<>!(){};])""",
    re.S,
)
_SPACED_OPS = {
    "+": ("-",),
    "-": ("+",),
    "*": ("/", "+"),
    "/": ("*",),
    "%": ("/",),
    "<": ("<=", ">"),
    ">": (">=", "<"),
}
_ANY_OPS = {
    "<=": ("<", ">="),
    ">=": (">", "<="),
    "==": ("!=",),
    "!=": ("==",),
    "===": ("!==",),
    "!==": ("===",),
    "&&": ("||",),
    "||": ("&&",),
}
_WORDS = {
    "true": ("false",),
    "false": ("true",),
    "and": ("or",),
    "or": ("and",),
    "-lt": ("-le", "-gt"),
    "-le": ("-lt", "-ge"),
    "-gt": ("-ge", "-lt"),
    "-ge": ("-gt", "-le"),
    "-eq": ("-ne",),
    "-ne": ("-eq",),
}


def token_edits(source: str, language: Language) -> list[Edit]:
    """All single semantic mutations of a C-family, PHP or Bash program."""
    tokens = [m for m in _TOKEN.finditer(source) if m.lastgroup != "skip"]
    edits: list[Edit] = []
    for k, token in enumerate(tokens):
        text, start, end = token.group(), token.start(), token.end()
        if token.lastgroup == "number" and "." not in text:
            digits = text.rstrip("lLuU")
            suffix = text[len(digits) :]
            values = (int(digits) + 1, int(digits) - 1)
            edits += [(start, end, f"{value}{suffix}") for value in values if value >= 0]
        elif token.lastgroup == "word":
            edits += [(start, end, other) for other in _WORDS.get(text, ())]
            if text in ("if", "while") and language != Language.BASH:
                edits += _negate_parenthesised(source, tokens, k)
            elif text in ("if", "while"):
                edits.append((end, end, " !"))
        elif text in _ANY_OPS or (text in _SPACED_OPS and _spaced(source, start, end)):
            edits += [(start, end, other) for other in (_ANY_OPS | _SPACED_OPS)[text]]
    return edits


def _spaced(source: str, start: int, end: int) -> bool:
    return source[start - 1 : start] == " " and source[end : end + 1] == " "


def _negate_parenthesised(source: str, tokens: list[re.Match[str]], k: int) -> list[Edit]:
    """`if (x)` becomes `if (!(x))`: find the parenthesis that closes the condition."""
    if k + 1 >= len(tokens) or tokens[k + 1].group() != "(":
        return []
    depth = 0
    for closing in tokens[k + 1 :]:
        depth += {"(": 1, ")": -1}.get(closing.group(), 0)
        if depth == 0:
            start, end = tokens[k + 1].end(), closing.start()
            return [(start, end, f"!({source[start:end]})")]
    return []
