"""A reader for CTranslate2's ``model.bin`` (binary version 6), without ``ctranslate2``.

The built-in Whisper base only ships as a CTranslate2 model; depending on the
``ctranslate2`` wheel just to read its weights would add a native library (and
its CUDA/ABI constraints) for one file. The format is small and stable: a
header, named tensors with shape and dtype, then name aliases. This module only
knows that layout; what the variables mean for a given architecture is the
caller's business (``streamer.engine.ct2_whisper`` for Whisper).

The model may be split into several files (PyPI size limits); they are read as
one stream, and each tensor is read straight into its own buffer, so the model
is held in memory once.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from streamer.errors import ConversionError

_BINARY_VERSION = 6
# CTranslate2's DataType enum, in order (include/ctranslate2/types.h).
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class CT2Model:
    """A parsed ``model.bin``: variables by name (aliases resolved by ``get``)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def get(self, name: str) -> torch.Tensor:
        return self.variables[self.aliases.get(name, name)]

    def require(self, name: str) -> torch.Tensor:
        """``get``, but a missing variable is a ConversionError naming it."""
        try:
            return self.get(name)
        except KeyError:
            raise ConversionError(f"model.bin has no variable {name!r}") from None

    def scalar(self, name: str) -> int:
        """A one-element variable (CT2 stores flags and head counts so) as an int."""
        return int(self.require(name).item())


class _PartsReader:
    """Sequential reads across the split model.bin files, as if they were one file."""

    def __init__(self, parts: Sequence[Path]) -> None:
        self._parts = list(parts)
        self._fh: io.FileIO | None = None
        self.offset = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def readinto(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            if self._fh is None:
                if not self._parts:
                    raise ConversionError(f"model.bin is truncated at byte {self.offset}")
                self._fh = open(self._parts.pop(0), "rb", buffering=0)  # noqa: SIM115
            n = self._fh.readinto(view[filled:])
            if not n:
                self._fh.close()
                self._fh = None
                continue
            filled += n
            self.offset += n

    def read(self, size: int) -> bytes:
        buf = bytearray(size)
        self.readinto(memoryview(buf))
        return bytes(buf)

    def at_end(self) -> bool:
        try:
            self.readinto(memoryview(bytearray(1)))
        except ConversionError:
            return True
        return False

    def unpack(self, fmt: str) -> int:
        value = struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]
        return int(value)

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        raw = self.read(length)
        if not raw or raw[-1] != 0:
            raise ConversionError(f"model.bin: malformed string at byte {self.offset}")
        return raw[:-1].decode("utf-8")


def read_ct2_model(parts: Sequence[Path]) -> CT2Model:
    """Parse CTranslate2's model.bin (binary version 6): header, variables, aliases.

    ``parts`` concatenate to the file. Each variable is read straight into its
    own buffer, so the file is held in memory once. Raises ConversionError.
    """
    with contextlib.closing(_PartsReader(parts)) as rd:
        if (version := rd.unpack("I")) != _BINARY_VERSION:
            raise ConversionError(f"model.bin binary version {version}, expected {_BINARY_VERSION}")
        spec = rd.string()
        revision = rd.unpack("I")
        variables: dict[str, torch.Tensor] = {}
        for _ in range(rd.unpack("I")):
            name = rd.string()
            shape = [rd.unpack("I") for _ in range(rd.unpack("B"))]
            type_id = rd.unpack("B")
            nbytes = rd.unpack("I")
            if type_id >= len(_DTYPES):
                raise ConversionError(f"model.bin: {name} has unknown dtype id {type_id}")
            dtype = _DTYPES[type_id]
            if math.prod(shape) * dtype.itemsize != nbytes or not nbytes:
                raise ConversionError(f"model.bin: {name} {shape} {dtype} has {nbytes} bytes")
            buf = bytearray(nbytes)  # the one copy of this variable
            rd.readinto(memoryview(buf))
            variables[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
        aliases: dict[str, str] = {}
        for _ in range(rd.unpack("I")):
            alias = rd.string()
            aliases[alias] = rd.string()
        if not rd.at_end():
            raise ConversionError("model.bin has trailing bytes after the aliases")
    for alias, target in aliases.items():
        if target not in variables:
            raise ConversionError(f"model.bin: alias {alias} points to missing {target}")
    return CT2Model(spec, revision, variables, aliases)
