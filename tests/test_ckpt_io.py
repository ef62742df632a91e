"""The checkpoint writer: the file's SHA-256 is the integrity check (torch.load never verifies
the zip CRC-32, so the writer skips computing it) and a written file loads as it was."""
from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from redheart.ckpt import io as ckio


def test_atomic_save_returns_the_files_sha256_and_skips_the_unchecked_zip_crc(tmp_path):
    state = {"model_state": {"w": torch.arange(50_000, dtype=torch.float32)}, "epoch": 3}
    path = tmp_path / "s.pt"
    info = ckio.atomic_save(state, path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and info["size"] == path.stat().st_size
    crcs = {i.filename.rsplit("/", 1)[-1]: i.CRC for i in zipfile.ZipFile(path).infolist()}
    assert crcs["0"] == 0  # the tensor's record: no CRC-32 computed
    again = torch.load(path, weights_only=True)
    assert torch.equal(again["model_state"]["w"], state["model_state"]["w"]) and again["epoch"] == 3


def test_a_flipped_byte_in_tensor_data_is_caught_by_the_sha256(tmp_path):
    path = tmp_path / "s.pt"
    info = ckio.atomic_save({"model_state": {"w": torch.arange(50_000, dtype=torch.float32)}}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model_state"]["w"].numel() == 50_000
    with pytest.raises(ckio.CheckpointError, match="corrupted: SHA-256"):
        ckio.load(path, info["sha256"])


def test_a_mapped_load_gives_the_same_tensors(tmp_path):
    """`mmap=True` (the analysis reads a resume state's weights without its AdamW moments)."""
    state = {"model_state": {"w": torch.randn(4, 3), "b": torch.arange(5)}, "optimizer": {"m": torch.randn(7)}}
    path = tmp_path / "s.pt"
    info = ckio.atomic_save(state, path)
    mapped = ckio.load(path, info["sha256"], mmap=True)
    for k, v in state["model_state"].items():
        assert torch.equal(mapped["model_state"][k], v)
    assert torch.equal(mapped["optimizer"]["m"], state["optimizer"]["m"])
