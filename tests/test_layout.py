"""The import rules of docs/ARCHITECTURE.md, checked on the source: every import,
including one inside a function, counts.

- `app/` is imported by nothing but `app/` (and tests, benchmarks).
- `pipelines/` imports only `models/`, itself and third-party libraries.
- `models/` imports only itself.
- `workers/` imports `models/`, `pipelines/` and itself, never `app/`.
- No import cycle between modules, hidden inside functions or not.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers", "models", "pipelines", "migrations")
ALLOWED = {
    "app": {"app", "workers", "models", "pipelines", "migrations"},
    "workers": {"workers", "models", "pipelines"},
    "pipelines": {"pipelines", "models"},
    "models": {"models"},
    "migrations": {"migrations", "models"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "versions" not in path.parts:
                found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module pkg.mod when there is one,
            # and otherwise a name defined in pkg.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                imported.add(target)
    return imported


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_import_points_down_the_layers():
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[name.split(".")[0]]
    )
    assert upward == []


def test_no_import_cycle():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The walk must catch the kind of cycle this layout once hid in a function."""
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from workers.runs import enqueue_training\n")
    assert _imports("models.example", source, {"workers.runs", "workers"}) == {"workers.runs"}


SENDS = {"enqueue_after_commit", "signature", "apply_async", "delay", "si", "s", "send_task"}
SENDERS = {
    "workers.iteration",  # the state machine: every pipeline step
    "workers.runs",  # a training run's own task, once its row exists
    "workers.after_commit",  # the buffer both of them send through
}


def test_only_the_state_machine_and_the_run_lifecycle_send_tasks():
    """Tasks never chain each other by hand: one decider sends what runs next."""
    senders = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else None
                called = called or (node.func.id if isinstance(node.func, ast.Name) else None)
                if called in SENDS and name not in SENDERS:
                    senders.add(f"{name}:{node.lineno} {called}")
    assert sorted(senders) == []
