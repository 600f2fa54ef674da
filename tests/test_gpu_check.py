"""bench/gpu_check.sh end to end in its CPU smoke mode: every check runs (tiny shapes) and writes its
figures to the results file, so only the CUDA-only branches are untried until a GPU run. It runs with
only the GPU image's distributions and the carried pins importable (tests/gpu_image.py)."""

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_check(tmp_path, image_python):
    out = tmp_path / "results.txt"
    env = {**os.environ, "PYTHON": str(image_python), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    text = out.read_text()
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]
    for name in ("sft_throughput", "train_checks", "codec_encode", "infer_rtf"):
        assert re.search(rf"--- {name}: exit 0 in \d+ s", text), name
    assert re.search(r"baseline: padded mb4.*\s\d+\s", text)
    assert re.search(r"ours: packed 2x512, sdpa .* ratio \d+\.\d+x", text)
    assert "train checks: PASS" in text and "exported model loads: True" in text
    assert "identical codes: True" in text
    assert re.search(r"RTF \d+\.\d+", text)
    assert text.rstrip().endswith("device cpu; failed checks: none")
