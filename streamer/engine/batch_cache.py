"""Batched KV caches: self-attention buffers that grow in place, and padding.

Running rows share one ``EncoderDecoderCache`` per group (``runner.py``,
``translate_runner.py``); rows joining a group are padded to its shape along
time (self-attention, left) or frames (cross-attention and encoder states,
right).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["GROW", "GrowingLayer", "growing_cache", "pad_time"]

#: Spare columns a self-attention cache buffer grows by (see GrowingLayer).
GROW = 64


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """Self-attention K/V as views of buffers with spare columns.

    ``DynamicLayer.update`` concatenates, copying the whole cache every step
    (rows x heads x length x head size per layer, K and V); here a step writes
    its column into the buffer, which grows by ``GROW`` columns when full.
    Whoever replaces ``keys``/``values`` (row selection, cutting left padding)
    gets a fresh buffer at the next update. Attention reads the same numbers.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        n = int(keys.shape[-2]) if keys.numel() else 0
        end = n + int(key_states.shape[-2])
        kbuf: torch.Tensor | None = getattr(self, "_kbuf", None)
        vbuf: torch.Tensor | None = getattr(self, "_vbuf", None)
        if (
            kbuf is None
            or vbuf is None
            or keys is not getattr(self, "_kview", None)
            or values is not getattr(self, "_vview", None)
            or kbuf.shape[2] < end
        ):
            shape = (*key_states.shape[:2], end + GROW, key_states.shape[3])
            kbuf, vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
            if n:
                kbuf[:, :, :n] = keys
                vbuf[:, :, :n] = values
            self._kbuf, self._vbuf = kbuf, vbuf
        kbuf[:, :, n:end] = key_states
        vbuf[:, :, n:end] = value_states
        keys = self.keys = self._kview = kbuf[:, :, :end]
        values = self.values = self._vview = vbuf[:, :, :end]
        return keys, values


def growing_cache(kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A ``DynamicCache`` of growing layers, optionally holding ``kv`` per layer."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    for keys, values in kv or []:
        layer = GrowingLayer()  # type: ignore[no-untyped-call]
        layer.update(keys, values)
        cache.layers.append(layer)
    return cache


def pad_time(
    x: torch.Tensor, dim: int, size: int, left: bool = False, value: float = 0
) -> torch.Tensor:
    """``x`` padded with ``value`` along ``dim`` to ``size`` (on the left or the right)."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + ([missing, 0] if left else [0, missing])
    return torch.nn.functional.pad(x, pad, value=value)
