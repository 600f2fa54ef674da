"""fsspec storage helpers on local paths, file:// URLs and memory:// (stands in for gs://)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer import io


@pytest.fixture(params=["local", "file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path)
    if request.param == "file":
        return f"file://{tmp_path}"
    return f"memory://test-{uuid.uuid4().hex}"


def test_write_read_list_exists(root: str) -> None:
    url = io.join(root, "a", "b.json")
    assert not io.exists(url)
    io.write_json_atomic(url, {"x": 1})
    io.write_text_atomic(io.join(root, "a", "c.txt"), "hello")
    assert io.exists(url) and io.read_json(url) == {"x": 1}
    assert io.read_text(io.join(root, "a", "c.txt")) == "hello"
    assert io.listdir(io.join(root, "a")) == ["b.json", "c.txt"]
    assert [u.rsplit("/", 1)[1] for u in io.glob(io.join(root, "a"), "*.json")] == ["b.json"]
    assert io.listdir(io.join(root, "nothing")) == []
    io.remove(url)
    assert not io.exists(url)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    url = str(tmp_path / "x.bin")
    io.write_bytes_atomic(url, b"1" * 1000)
    io.write_bytes_atomic(url, b"2")
    assert Path(url).read_bytes() == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_staged_dir_publishes_only_complete_directories(root: str) -> None:
    dest = io.join(root, "ckpt", "step_10")
    with io.staged_dir(dest) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text("{}")
        assert not io.exists(dest)
    assert io.is_complete(dest)
    assert io.read_bytes(io.join(dest, "weights.bin")) == b"w"
    assert io.read_text(io.join(dest, "sub", "state.json")) == "{}"

    failed = io.join(root, "ckpt", "step_20")
    with pytest.raises(RuntimeError), io.staged_dir(failed) as tmp:
        (tmp / "weights.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert not io.exists(failed) and not io.is_complete(failed)
    if io.is_local(root):  # no scratch directories left beside the checkpoints
        assert io.listdir(io.join(root, "ckpt")) == ["step_10"]


def test_download_dir_roundtrip(tmp_path: Path) -> None:
    src = f"memory://dl-{uuid.uuid4().hex}"
    io.write_text_atomic(io.join(src, "m", "config.json"), "{}")
    io.write_bytes_atomic(io.join(src, "m", "w", "0.bin"), b"abc")
    local = io.download_dir(io.join(src, "m"), tmp_path / "copy")
    assert (local / "config.json").read_text() == "{}"
    assert (local / "w" / "0.bin").read_bytes() == b"abc"
    assert io.download_dir(str(tmp_path), tmp_path / "unused") == tmp_path


def test_local_path() -> None:
    assert io.local_path("file:///data/x") == "/data/x"
    assert io.local_path("rel/x") == "rel/x"
    assert io.is_local("/abs") and not io.is_local("gs://bucket/x")
    with pytest.raises(ValueError):
        io.local_path("gs://bucket/x")


def test_a_published_directory_is_readable_by_other_users(tmp_path: Path) -> None:
    """mkdtemp makes the staging directory 0700 and safetensors writes 0600: a checkpoint published to a
    shared volume was unreadable by the run's other pods when they run under another uid."""
    dest = tmp_path / "model"
    with io.staged_dir(str(dest)) as staging:
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        (staging / "sub").mkdir(mode=0o700)
    for path in (dest, dest / "sub", dest / "model.safetensors", dest / io.COMPLETE_MARKER):
        assert path.stat().st_mode & 0o044 == 0o044, (path, oct(path.stat().st_mode))
    assert (dest / "sub").stat().st_mode & 0o011 == 0o011
