"""Integrity of checkpoint folders: a sha256 manifest, and a safetensors sanity check.

The Whisper base converter (``streamer.engine.ct2_whisper``) writes
``streamer-manifest.json`` into every folder it produces: the size and sha256
of each file. Every load checks it (sizes first, so a truncated file is named
without hashing anything, then the hashes: about 0.1 s for Whisper base's
145 MB with SHA-NI), because a file damaged without changing its size loads
"fine" and decodes garbage.

Checkpoints from elsewhere carry no manifest; ``check_safetensors`` reads only
the header of each ``*.safetensors`` file and compares the data length it
announces with the file's size, to name a truncated or corrupt file where
safetensors says only "Error while deserializing header".
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST_NAME = "streamer-manifest.json"
MANIFEST_FORMAT = 1
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged file of a checkpoint folder and why."""

    file: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.file} {self.reason}"


def file_sha256(path: Path) -> str:
    """The sha256 of one file, read in large unbuffered chunks."""
    with open(path, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record the size and sha256 of every file below ``folder``; returns the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            name = path.relative_to(folder).as_posix()
            files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = folder / MANIFEST_NAME
    data = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    manifest.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return manifest


def _read_entries(manifest: Path) -> dict[str, tuple[int, str]] | None:
    """name -> (size, sha256), or None when the manifest is not one of ours."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data["format"] != MANIFEST_FORMAT or data["algorithm"] != "sha256":
            return None
        entries = {
            str(name): (int(entry["size"]), str(entry["sha256"]))
            for name, entry in data["files"].items()
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    for name in entries:  # a damaged manifest must not send us outside the folder
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts:
            return None
    return entries


def verify_manifest(folder: Path, *, required: bool) -> Damage | None:
    """Check ``folder`` against its manifest; None when every listed file matches.

    Without a manifest: a Damage when ``required``, else None (nothing to check).
    Files the manifest does not list are ignored.
    """
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return Damage(manifest, "is missing") if required else None
    entries = _read_entries(manifest)
    if entries is None:
        return Damage(manifest, "is unreadable or corrupt")
    for name, (size, _) in entries.items():
        path = folder / name
        try:
            got = path.stat().st_size
        except OSError:
            return Damage(path, "is missing")
        if got < size:
            return Damage(path, f"is truncated ({got} of {size} bytes)")
        if got != size:
            return Damage(path, f"has the wrong size ({got} bytes, expected {size})")
    for name, (_, sha) in entries.items():
        path = folder / name
        try:
            got_sha = file_sha256(path)
        except OSError as exc:
            return Damage(path, f"is unreadable ({exc.strerror or exc})")
        if got_sha != sha:
            return Damage(path, "is corrupt (its sha256 differs from the manifest)")
    return None


def check_safetensors(path: Path) -> Damage | None:
    """Compare a safetensors file's size with the length its header announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                return Damage(path, f"is truncated or corrupt ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                return Damage(path, f"is truncated or corrupt (header length {header_len})")
            header = json.loads(fh.read(header_len))
        ends = [
            int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"
        ]
    except OSError as exc:
        return Damage(path, f"is unreadable ({exc.strerror or exc})")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return Damage(path, "is corrupt (its header is not valid safetensors JSON)")
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return Damage(path, f"is truncated ({size} of {expected} bytes)")
    if size != expected:
        return Damage(path, f"is corrupt ({size} bytes, its header describes {expected})")
    return None


def check_safetensors_folder(folder: Path) -> Damage | None:
    """The first ``*.safetensors`` file in ``folder`` that ``check_safetensors`` rejects."""
    for path in sorted(folder.glob("*.safetensors")):
        damage = check_safetensors(path)
        if damage is not None:
            return damage
    return None
