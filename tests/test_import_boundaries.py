"""Package boundaries, read from the source with `ast` (imports inside functions count too).

The layers of ARCHITECTURE.md, bottom to top: a module imports only from its own layer or below, no
two modules import each other (directly or around a circle), and an import inside a function is
there only to keep a heavy dependency out of a light path, saying so (`# lazy: <why>`). Speech scoring
has one home, `trainer.scoring`, used by the GRPO rewards and the eval harness alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "trainer"
SCORING_LIBRARIES = {"jiwer", "pocketsphinx", "speechmos", "resemblyzer", "onnxruntime"}
# package (path under trainer/) -> module prefixes it must not import
FORBIDDEN = {
    "serve": ("trainer.rl",),
    "eval": ("trainer.rl",),
    "scoring": ("trainer.rl", "trainer.eval", "trainer.serve", "trainer.train"),
}


# Bottom to top (ARCHITECTURE.md). Prefixes name packages or modules.
LAYERS = (
    ("trainer.errors", "trainer.io", "trainer.config_compat", "trainer.config", "trainer.audio",
     "trainer.distributed", "trainer.metrics"),
    ("trainer.model", "trainer.codec"),
    ("trainer.data", "trainer.scoring"),
    ("trainer.train",),
    ("trainer.serve",),
    ("trainer.eval",),
    ("trainer.rl",),
    ("trainer.stages", "trainer.cli", "trainer.__main__", "trainer.torchrun"),
    ("controller",),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_nodes(path: Path) -> list[tuple[ast.stmt, set[str], bool]]:
    """(node, absolute names it imports, whether it sits inside a function) per import. `from a import b`
    names `a` and `a.b`: the package `a` runs first, and `b` is a module of it or a name in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    in_function = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for sub in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = {base, *(f"{base}.{alias.name}" for alias in node.names)}
        else:
            continue
        found.append((node, names, id(node) in in_function))
    return found


def imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    return {name for _, names, _ in _import_nodes(path) for name in names}


def _ours() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted([*PACKAGE.rglob("*.py"), *(REPO / "controller").rglob("*.py")])}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that an imported name lives in (`a.b.f` -> `a.b`), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _layer(module: str) -> int:
    if module in ("trainer", "controller"):  # the packages' own (empty) __init__
        return 0
    return next(i for i, layer in enumerate(LAYERS) for p in layer if module == p or module.startswith(p + "."))


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports. `from pkg import module` is an edge to the module only:
    the package is being initialised already when one of its own modules imports a sibling this way."""
    modules = _ours()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for _, names, _ in _import_nodes(path):
            exact = {name for name in names if name in modules}
            exact -= {name.rpartition(".")[0] for name in exact}  # `from pkg import module`: the module
            for name in exact or names:
                target = _resolve(name, modules)
                if target and target != module and not (exact and target != name):
                    targets.add(target)
        graph[module] = targets
    return graph


def _sources(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def test_the_parser_sees_imports_in_functions_and_relative_ones(tmp_path):
    module = PACKAGE / "eval" / "harness.py"
    assert "trainer.scoring.scorers" in imports(module)
    assert "trainer.serve.synthesize" in imports(module)  # imported inside _synthesize_items()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_what_it_must_not(package):
    bad = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name for name in imports(path) if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[package])
        )
        for path in _sources(package)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_speech_scoring_libraries_are_imported_only_by_trainer_scoring():
    outside = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name for name in imports(path) if name.split(".")[0] in SCORING_LIBRARIES
        )
        for path in _sources()
        if "scoring" not in path.relative_to(PACKAGE).parts[:1]
    }
    assert not {k: v for k, v in outside.items() if v}


def test_eval_and_rewards_score_through_trainer_scoring():
    assert any(name.startswith("trainer.scoring") for name in imports(PACKAGE / "eval" / "harness.py"))
    assert any(name.startswith("trainer.scoring") for name in imports(PACKAGE / "rl" / "rewards" / "functions.py"))


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    upward = {m: sorted(t for t in targets if _layer(t) > _layer(m)) for m, targets in _graph().items()}
    assert not {m: t for m, t in upward.items() if t}


def test_no_import_circles_between_modules():
    graph, index, low, stack, on_stack, circles = _graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert circles == []


def test_imports_inside_functions_say_why():
    unexplained = []
    for module, path in _ours().items():
        lines = path.read_text().splitlines()
        for node, _, in_function in _import_nodes(path):
            # the reason on the import's line or above it, once for a group of imports
            near = "".join(lines[max(0, node.lineno - 4) : node.lineno])
            if in_function and "# lazy:" not in near:
                unexplained.append(f"{module}:{node.lineno}")
    assert unexplained == []
