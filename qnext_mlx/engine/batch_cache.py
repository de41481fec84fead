"""The batched cache: every running sequence's layer states, stacked on the batch axis.

A sequence is prefilled alone, in a one-row :class:`~qnext_mlx.model.ModelCache`; when its
prompt is done its states join the running batch (:meth:`BatchCache.add`), and when it
finishes they leave it (:meth:`BatchCache.remove`, after :meth:`BatchCache.extract` when
they are kept). Per layer:

* Gated DeltaNet: mlx-lm's ``ArraysCache`` holding ``[conv [B, K-1, C], recurrent [B, Hv, Dv, Dk]]``;
  rows are independent, and a decode step feeds every row one real token, so no padded
  position ever reaches a DeltaNet state.
* attention: mlx-lm's ``BatchKVCache`` (or :class:`BatchQuantizedKVCache`, which mlx-lm
  lacks): the sequences' keys and values right-aligned in one buffer, shorter ones
  left-padded, with per-row offsets (RoPE positions) and a mask that hides the padding.

The model runs a ``[B, 1]`` decode step on a :class:`BatchCache` as on a ``ModelCache``
(it is a list of per-layer caches); the per-row results equal one-row runs.
"""

from __future__ import annotations

from typing import List, Sequence

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache, QuantizedKVCache

from ..model.cache import ModelCache

__all__ = ["BatchCache", "BatchQuantizedKVCache"]


class BatchQuantizedKVCache:
    """A left-padded batch of quantized KV caches (mlx-lm's ``BatchKVCache`` layout,
    ``QuantizedKVCache`` storage).

    Keys and values are ``(packed uint32 [B, H, S, D*bits/32], scales [B, H, S, D/g],
    biases [B, H, S, D/g])`` tuples; ``left_padding [B]`` counts each row's padded
    positions at the start, ``offset [B]`` its real tokens (the next RoPE position).
    ``bits`` and ``group_size`` make mlx-lm's attention take its quantized path.
    """

    step = 256

    def __init__(self, left_padding: Sequence[int], group_size: int = 64, bits: int = 8):
        self.keys = None
        self.values = None
        self.left_padding = mx.array(list(left_padding), dtype=mx.int32)
        self.offset = -self.left_padding
        self._idx = 0
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append ``keys``/``values`` ``[B, H, L, D]`` (quantized) and return the whole buffers."""
        B, H, L, Dk = keys.shape
        Dv = values.shape[-1]
        prev = self._idx
        if self.keys is None or prev + L > self.keys[0].shape[-2]:
            per_int = 32 // self.bits
            steps = (self.step + L - 1) // self.step * self.step

            def fresh(dim):
                return (
                    mx.zeros((B, H, steps, dim // per_int), dtype=mx.uint32),
                    mx.zeros((B, H, steps, dim // self.group_size), dtype=keys.dtype),
                    mx.zeros((B, H, steps, dim // self.group_size), dtype=keys.dtype),
                )

            new_k, new_v = fresh(Dk), fresh(Dv)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                trimmed = tree_map(lambda x: x[..., :prev, :], (self.keys, self.values))
                self.keys, self.values = tree_map(lambda x, y: mx.concatenate([x, y], axis=-2), trimmed, (new_k, new_v))
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        self._idx += L
        self.offset = self.offset + L
        for i in range(3):
            self.keys[i][..., prev : self._idx, :] = qk[i]
            self.values[i][..., prev : self._idx, :] = qv[i]
        return self.keys_and_values()

    def keys_and_values(self):
        return tree_map(lambda x: x[..., : self._idx, :], (self.keys, self.values))

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    @property
    def state(self):
        """``(keys, values, offset, left_padding, filled positions)``, as mlx-lm's ``BatchKVCache``."""
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self.keys + self.values)

    def filter(self, batch_indices) -> None:
        """Keep the rows ``batch_indices`` (and drop the padding they all share)."""
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shared = min(self.left_padding.tolist()) if self.left_padding.size else 0
        if shared > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., shared:, :], (self.keys, self.values))
            self._idx -= shared
            self.left_padding = self.left_padding - shared

    def extend(self, other: "BatchQuantizedKVCache") -> None:
        """Append ``other``'s rows, right-aligning both at the longer one's end."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        full = self if self.keys is not None else other

        def aligned(c: "BatchQuantizedKVCache"):
            rows = c.left_padding.shape[0]
            if c.keys is None:  # no positions yet: empty buffers shaped like the other side's
                kv = tree_map(lambda t: mx.zeros((rows, t.shape[1], 0, t.shape[3]), dtype=t.dtype),
                              (full.keys, full.values))  # fmt: skip
            else:
                kv = tree_map(lambda x: x[..., : c._idx, :], (c.keys, c.values))
            pad = idx - c._idx
            if pad:
                kv = tree_map(lambda x: mx.pad(x, [(0, 0), (0, 0), (pad, 0), (0, 0)]), kv)
            return kv, c.left_padding + pad

        (k1, v1), lp1 = aligned(self)
        (k2, v2), lp2 = aligned(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.left_padding = mx.concatenate([lp1, lp2])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = idx


def _batch_row(c) -> object:
    """A one-row batch cache holding a one-row ``KVCache`` / ``QuantizedKVCache`` / ``ArraysCache``."""
    if isinstance(c, ArraysCache):
        row = ArraysCache(size=len(c.cache))
        row.cache = list(c.cache)
        return row
    n = c.offset if c.keys is not None else 0
    if isinstance(c, QuantizedKVCache):
        row = BatchQuantizedKVCache([0], group_size=c.group_size, bits=c.bits)
        keys, values = tree_map(lambda x: x[..., :n, :], (c.keys, c.values)) if n else (None, None)
    else:
        row = BatchKVCache([0])
        keys, values = (c.keys[..., :n, :], c.values[..., :n, :]) if n else (None, None)
    row.state = (keys, values, mx.array([n], dtype=mx.int32), mx.array([0], dtype=mx.int32), n)
    return row


def _copy(x: mx.array) -> mx.array:
    """A copy of ``x`` in memory of its own: a slice of a batch buffer would keep the whole
    buffer alive for as long as the row is kept."""
    return x * 1


def _row_of(c, i: int, like) -> object:
    """Row ``i`` of a batch layer cache as a one-row cache of the type of ``like``."""
    if isinstance(c, ArraysCache):
        row = ArraysCache(size=len(c.cache))
        row.cache = [None if x is None else _copy(x[i : i + 1]) for x in c.cache]
        return row
    keys, values, _, left_padding, idx = c.state
    pad = int(left_padding[i].item())
    n = idx - pad if keys is not None else 0
    if isinstance(like, QuantizedKVCache):
        row = QuantizedKVCache(group_size=like.group_size, bits=like.bits)
        if n:
            row.keys, row.values = tree_map(lambda x: _copy(x[i : i + 1, :, pad:idx, :]), (keys, values))
    else:
        row = KVCache()
        if n:
            row.keys, row.values = _copy(keys[i : i + 1, :, pad:idx, :]), _copy(values[i : i + 1, :, pad:idx, :])
    row.offset = n
    return row


class BatchCache(list):
    """Per-layer batch caches of the running sequences (list order = layer order; row order
    = the order sequences were added, minus the removed ones)."""

    def __init__(self, layers=()):
        super().__init__(layers)

    @property
    def size(self) -> int:
        """Number of rows (sequences)."""
        for c in self:
            if isinstance(c, ArraysCache):
                if c.cache[0] is not None:
                    return c.cache[0].shape[0]
            else:
                return c.state[3].shape[0]
        return 0

    def add(self, cache: ModelCache) -> None:
        """Append the states of a one-row ``cache`` (a finished prefill) as a new row."""
        rows = [_batch_row(c) for c in cache]
        if not len(self):
            self.extend(rows)
            return
        for mine, row in zip(self, rows):
            mine.extend(row)

    def remove(self, keep: List[int]) -> None:
        """Keep only the rows ``keep`` (indices into the current rows, in order)."""
        if not keep:
            self.clear()
            return
        idx = mx.array(keep, dtype=mx.int32)
        for c in self:
            c.filter(idx)

    def extract(self, i: int, into: ModelCache) -> ModelCache:
        """Put row ``i``'s states into the one-row ``into`` (its layers' types are kept);
        the token record and the MTP caches of ``into`` are left to the caller."""
        for j, (c, like) in enumerate(zip(self, list(into))):
            into[j] = _row_of(c, i, like)
        return into

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self if not c.empty())
