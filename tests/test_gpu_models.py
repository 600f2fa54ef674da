"""example/gpu_models.sh (the example SpeechLM's GPU run) end to end on the CPU: --prepare packs the
merged codes, the smoke run trains both arms a few steps through `tts-train sft`/`export` and splits
each best model into parts the device tool brings back, --collect reassembles loadable models.

The smoke run sees only the Python distributions the GPU image has (bench/gpu_image_packages.txt) and
the ones bench/gpu_site.sh carries there: an import of anything else fails here as it would there."""

import os
import re
import subprocess
import sys
import tarfile

import torch
from gpu_image import carried_pins
from safetensors.torch import load_file
from speechlm_fixtures import REPO, write_vectorized

from trainer.model.build import load_speechlm

ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _script(*args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "example/gpu_models.sh", *args], cwd=REPO, env={**ENV, **env},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# The codes of the corpora a real --prepare packs (c12k + the default-size corpus: 3.3 MB, bench/RESULTS.md
# 2026-12-03); the test's own codes are a few KB, so the call it measures must leave this much room.
CORPUS_CODES_MIB = 4


def test_prepare_merges_and_packs_the_codes_within_the_device_limit(tmp_path):
    """--prepare as a user runs it: the pinned site is fetched from PyPI and packed, so the size a device call
    would carry counts the tracked tree (the shipped models included) and the real site."""
    vecs = [write_vectorized(tmp_path / "vec", sharded=True), write_vectorized(tmp_path / "vec2", seed=1)]
    gpu = tmp_path / "gpu"
    proc = _script("--prepare", *map(str, vecs), GPU_DIR=str(gpu))
    carried = re.search(r"a device call would carry (\d+) MiB of at most 64", proc.stdout)
    assert carried and int(carried[1]) + CORPUS_CODES_MIB <= 64, proc.stdout
    assert (gpu / "site-py312.pins").read_text().split() == carried_pins()
    with tarfile.open(gpu / "vectorized.tar.xz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames() if tar.getmember(n).isfile()}
    files = ["train_codes.npy", "train_codes_index.npy", "train_samples.jsonl", "val_codes.npy",
             "val_codes_index.npy", "val_samples.jsonl", "dataset_info.json"]
    assert names == {f"{i}/{f}" for i in ("0", "1") for f in files}  # the merged files, one dir per corpus


def test_image_python_lacks_what_the_image_lacks(image_python):
    def imports(module: str) -> bool:
        return subprocess.run([str(image_python), "-c", f"import {module}"], capture_output=True).returncode == 0

    assert imports("transformers") and imports("soundfile")  # the image's; carried
    assert not imports("deepspeed") and not imports("jiwer")  # ours, not the image's


def test_smoke_run_trains_both_arms_and_collect_reassembles_the_best_models(tmp_path, image_python):
    data = tmp_path / "data"  # as --prepare packs it: one directory per corpus
    for i in range(2):
        write_vectorized(data / str(i), n_train=20, n_val=4, codebook_size=4096, seed=i)
    out = tmp_path / "out"
    _script("--smoke", "--out", str(out), GPU_MODELS_SMOKE_DATA=str(data), PYTHON=str(image_python))
    results = (out / "results.txt").read_text()
    parts = sorted(p for p in out.iterdir() if ".tar.part-" in p.name)
    assert len(parts) <= 7 and all(p.stat().st_size <= 15 * 2**20 for p in parts)  # device tool: 8 x 16 MiB
    _script("--collect", str(out), "--to", str(tmp_path / "models"))
    for name, hidden in (("small", 256), ("small-wide", 384)):
        best = re.search(rf'^{name}: {{"step": (\d+), "eval_loss": ([\d.]+)}} -> \d part\(s\)$', results, re.M)
        assert best, results
        arm = tmp_path / "models" / name
        log = (arm / f"{name}.log").read_text()
        assert f"step {best.group(1)} eval_loss" in log
        assert "train: 40 samples" in log  # both corpora of 20
        stored = load_file(arm / "model" / "model.safetensors")
        assert {t.dtype for t in stored.values()} == {torch.float16}
        model = load_speechlm(str(arm / "model"))[0]
        assert model.config.hidden_size == hidden and model.dtype == torch.float32
