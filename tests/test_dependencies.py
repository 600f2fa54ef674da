"""pyproject.toml's dependency ranges hold exactly what is tested: every pin of constraints/ (what CI and
the images install) lies inside its range, and the HF stack's ranges are bounded above (the top is
what `make test-latest` checks)."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
HF_STACK = ("transformers", "trl", "peft", "accelerate", "datasets")


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    out: dict[str, Requirement] = {}
    for req in reqs:
        out.setdefault(req.name.lower(), req)
    return out


def test_pins_lie_inside_the_declared_ranges():
    reqs = _requirements()
    text = (REPO / "constraints" / "common.txt").read_text()
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)", text, flags=re.M))
    assert set(HF_STACK) <= set(pins)
    for name, version in pins.items():
        assert name.lower() in reqs, f"{name} is pinned but not a dependency"
        assert reqs[name.lower()].specifier.contains(version), f"{name}=={version} outside {reqs[name.lower()]}"


def test_hf_stack_ranges_are_bounded_above():
    reqs = _requirements()
    for name in HF_STACK:
        assert any(spec.operator in ("<", "<=", "==") for spec in reqs[name].specifier), str(reqs[name])
