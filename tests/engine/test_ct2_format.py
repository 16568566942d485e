"""The CTranslate2 ``model.bin`` reader, on small files written here byte by byte.

The real 145 MB file is read by the Whisper converter's tests; these pin the
layout itself (header, variables, aliases, dtypes) and every way a file is refused.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.engine.ct2_format import read_ct2_model
from streamer.errors import ConversionError


def _ct2_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def _write_ct2(
    path: Path,
    *,
    version: int = 6,
    extra: bytes = b"",
    weight_type: int = 4,
    weight_nbytes: int | None = None,
    alias_target: str = "a/weight",
) -> None:
    """A WhisperSpec revision 3 file: a 2x3 float16 ``a/weight``, an int16 scalar
    ``a/num_heads`` = 8, and the alias ``b/weight`` -> ``alias_target``."""
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    nbytes = weight.nbytes if weight_nbytes is None else weight_nbytes
    out = struct.pack("<I", version) + _ct2_string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", 2)
    out += _ct2_string("a/weight") + struct.pack("<B", 2) + struct.pack("<II", 2, 3)
    out += struct.pack("<BI", weight_type, nbytes) + weight.tobytes()
    out += _ct2_string("a/num_heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2)
    out += struct.pack("<h", 8)
    out += struct.pack("<I", 1) + _ct2_string("b/weight") + _ct2_string(alias_target)
    path.write_bytes(out + extra)


def test_reads_variables_and_aliases_across_parts(tmp_path: Path) -> None:
    whole = tmp_path / "model.bin"
    _write_ct2(whole)
    data = whole.read_bytes()
    parts = [tmp_path / "p1", tmp_path / "p2", tmp_path / "p3"]
    # cuts inside the version word and inside a variable's data
    for part, chunk in zip(parts, (data[:3], data[3:40], data[40:]), strict=True):
        part.write_bytes(chunk)
    model = read_ct2_model(parts)
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    assert model.aliases == {"b/weight": "a/weight"}
    assert set(model.variables) == {"a/weight", "a/num_heads"}
    assert model.get("b/weight").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert model.get("b/weight").dtype == torch.float16
    assert model.get("a/num_heads").dtype == torch.int16
    assert int(model.get("a/num_heads")) == 8


def test_dtype_ids_follow_ctranslate2(tmp_path: Path) -> None:
    """The id picks the element type, and the byte count must fit the shape with it."""
    path = tmp_path / "model.bin"
    _write_ct2(path, weight_type=5)
    assert read_ct2_model([path]).get("a/weight").dtype == torch.bfloat16
    _write_ct2(path, weight_type=0)  # the same 12 bytes cannot hold 2x3 float32
    with pytest.raises(ConversionError, match=r"a/weight \[2, 3\] torch.float32 has 12 bytes"):
        read_ct2_model([path])


def test_require_and_scalar(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    _write_ct2(path)
    model = read_ct2_model([path])
    assert model.require("b/weight") is model.variables["a/weight"]
    assert model.scalar("a/num_heads") == 8
    assert type(model.scalar("a/num_heads")) is int
    with pytest.raises(KeyError):
        model.get("missing/var")
    for lookup in (model.require, model.scalar):
        with pytest.raises(ConversionError, match=r"model\.bin has no variable 'missing/var'"):
            lookup("missing/var")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 5}, "binary version 5, expected 6"),
        ({"extra": b"\0"}, "trailing bytes"),
        ({"weight_type": 6}, "a/weight has unknown dtype id 6"),
        ({"weight_nbytes": 10}, r"a/weight \[2, 3\] torch.float16 has 10 bytes"),
        ({"alias_target": "nowhere"}, "alias b/weight points to missing nowhere"),
    ],
)
def test_rejects_unexpected_files(tmp_path: Path, kwargs: dict, match: str) -> None:
    path = tmp_path / "model.bin"
    _write_ct2(path, **kwargs)
    with pytest.raises(ConversionError, match=match):
        read_ct2_model([path])


def test_reports_truncation(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    _write_ct2(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2_model([path])


def test_rejects_a_string_without_its_nul(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    _write_ct2(path)
    data = bytearray(path.read_bytes())
    spec_end = 4 + 2 + len("WhisperSpec")  # version, length, text: the NUL is here
    data[spec_end] = ord("x")
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="malformed string"):
        read_ct2_model([path])
