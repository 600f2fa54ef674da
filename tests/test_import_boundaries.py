"""Package boundaries, read from the source with `ast` (imports inside functions count too).

Speech scoring has one home, `trainer.scoring`, used by the GRPO rewards and the eval harness alike;
serving and eval never reach into GRPO code; scoring depends on no stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trainer"
SCORING_LIBRARIES = {"jiwer", "pocketsphinx", "speechmos", "resemblyzer", "onnxruntime"}
# package (path under trainer/) -> module prefixes it must not import
FORBIDDEN = {
    "serve": ("trainer.rl",),
    "eval": ("trainer.rl",),
    "scoring": ("trainer.rl", "trainer.eval", "trainer.serve", "trainer.train"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _sources(under: str = "") -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py"))


def test_the_parser_sees_imports_in_functions_and_relative_ones(tmp_path):
    module = PACKAGE / "eval" / "harness.py"
    assert "trainer.scoring.asr" in imports(module)
    assert "trainer.serve.synthesize" in imports(module)  # imported inside run()


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
