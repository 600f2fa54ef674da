"""A python that sees only what the GPU machine's image would give our scripts: the image's distributions
(bench/gpu_image_packages.txt) and the pins bench/gpu_site.sh carries there, taken from our venv."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from speechlm_fixtures import REPO


def carried_pins() -> list[str]:
    proc = subprocess.run(["bash", "-c", 'source bench/gpu_site.sh && printf "%s\\n" "${GPU_PINS[@]}"'], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return proc.stdout.split()


@pytest.fixture(scope="session")
def image_python(tmp_path_factory) -> Path:
    """A python that imports only what the GPU machine would have: our venv's copies of the image's
    distributions and of the carried pins, linked into one directory, without site-packages (-S)."""
    root = tmp_path_factory.mktemp("image")
    listed = (REPO / "bench" / "gpu_image_packages.txt").read_text().splitlines()
    allowed = {canonicalize_name(line) for line in listed if line and not line.startswith("#")}
    allowed |= {canonicalize_name(pin.split("==")[0]) for pin in carried_pins()}
    site = root / "site"
    site.mkdir()
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in allowed:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            src, dst = Path(dist.locate_file(top)), site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    python = root / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site}:$PYTHONPATH exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    return python
