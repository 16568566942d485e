"""Checkpoint integrity: the sha256 manifest and the safetensors header check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from streamer.engine.cache_manifest import (
    MANIFEST_NAME,
    check_safetensors,
    check_safetensors_folder,
    file_sha256,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(bytes(range(256)) * 1024)
    (root / "config.json").write_text("{}")
    (root / "sub" / "vocab.txt").write_text("a\nb\n")
    write_manifest(root)
    return root


def test_manifest_lists_every_file_with_size_and_sha256(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    assert data["algorithm"] == "sha256"
    assert set(data["files"]) == {"weights.bin", "config.json", "sub/vocab.txt"}
    entry = data["files"]["weights.bin"]
    assert entry == {"size": 256 * 1024, "sha256": file_sha256(folder / "weights.bin")}
    assert verify_manifest(folder, required=True) is None


def test_same_size_corruption_names_the_file(folder: Path) -> None:
    path = folder / "weights.bin"
    with open(path, "r+b") as fh:
        fh.seek(100_000)
        fh.write(os.urandom(50_000))
    damage = verify_manifest(folder, required=True)
    assert damage is not None and damage.file == path
    assert "corrupt" in str(damage) and str(path) in str(damage)


def test_truncation_is_found_by_size(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    os.truncate(folder / "weights.bin", 1000)
    monkeypatch.setattr("streamer.engine.cache_manifest.file_sha256", pytest.fail)  # no hashing
    damage = verify_manifest(folder, required=True)
    assert damage is not None and damage.file == folder / "weights.bin"
    assert damage.reason == f"is truncated (1000 of {256 * 1024} bytes)"


def test_missing_and_grown_files(folder: Path) -> None:
    (folder / "sub" / "vocab.txt").unlink()
    damage = verify_manifest(folder, required=True)
    assert damage is not None and damage.file == folder / "sub" / "vocab.txt"
    assert damage.reason == "is missing"
    write_manifest(folder)
    with open(folder / "config.json", "a") as fh:
        fh.write(" ")
    damage = verify_manifest(folder, required=True)
    assert damage is not None and "wrong size" in damage.reason


def test_files_added_later_are_ignored(folder: Path) -> None:
    (folder / "notes.txt").write_text("mine")
    assert verify_manifest(folder, required=True) is None


def test_without_a_manifest(tmp_path: Path) -> None:
    assert verify_manifest(tmp_path, required=False) is None
    damage = verify_manifest(tmp_path, required=True)
    assert damage is not None and damage.file == tmp_path / MANIFEST_NAME
    assert damage.reason == "is missing"


@pytest.mark.parametrize(
    "text",
    [
        "\x00garbage",
        "[]",
        json.dumps({"format": 99, "algorithm": "sha256", "files": {}}),
        json.dumps({"format": 1, "algorithm": "md5", "files": {}}),
        json.dumps({"format": 1, "algorithm": "sha256", "files": {"../x": {"size": 1}}}),
        json.dumps(
            {
                "format": 1,
                "algorithm": "sha256",
                "files": {"/etc/passwd": {"size": 1, "sha256": ""}},
            }
        ),
    ],
)
def test_a_damaged_manifest_is_damage(folder: Path, text: str) -> None:
    (folder / MANIFEST_NAME).write_text(text)
    damage = verify_manifest(folder, required=False)
    assert damage is not None and damage.file == folder / MANIFEST_NAME
    assert "corrupt" in damage.reason


# --------------------------------------------------------------------------- safetensors


@pytest.fixture
def tensors(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(10, 10)}, str(path), {"format": "pt"})
    return path


def test_an_intact_safetensors_file_passes(tensors: Path) -> None:
    assert check_safetensors(tensors) is None
    assert check_safetensors_folder(tensors.parent) is None


def test_truncated_safetensors(tensors: Path) -> None:
    size = tensors.stat().st_size
    os.truncate(tensors, size - 100)
    damage = check_safetensors_folder(tensors.parent)
    assert damage is not None and damage.file == tensors
    assert damage.reason == f"is truncated ({size - 100} of {size} bytes)"


@pytest.mark.parametrize("cut", [0, 5, 20])
def test_safetensors_cut_inside_its_header(tensors: Path, cut: int) -> None:
    os.truncate(tensors, cut)
    damage = check_safetensors(tensors)
    assert damage is not None and "truncated or corrupt" in damage.reason


def test_safetensors_with_trailing_bytes_or_garbage(tensors: Path) -> None:
    with open(tensors, "ab") as fh:
        fh.write(b"extra")
    damage = check_safetensors(tensors)
    assert damage is not None and damage.reason.startswith("is corrupt")
    tensors.write_bytes(b"not a safetensors file")
    damage = check_safetensors(tensors)
    assert damage is not None and "corrupt" in damage.reason
    header = b"{not json"
    tensors.write_bytes(len(header).to_bytes(8, "little") + header)
    damage = check_safetensors(tensors)
    assert damage is not None and "not valid safetensors JSON" in damage.reason
