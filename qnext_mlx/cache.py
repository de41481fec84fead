"""The per-model cache for incremental decoding.

:class:`ModelCache` is a list with one mlx-lm cache per decoder layer (an
``ArraysCache(size=2)`` holding conv + recurrent state for Gated DeltaNet
layers, a ``KVCache`` / ``QuantizedKVCache`` for attention layers), so mlx-lm's
generation helpers accept it as they are, plus the MTP head's KV caches.
"""

from __future__ import annotations

from typing import List, Optional

from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache


class ModelCache(list):
    """Per-layer caches of one model (list order = layer order) and its MTP caches."""

    def __init__(self, layers=(), mtp: Optional[List] = None):
        super().__init__(layers)
        self.mtp = mtp or []

    @classmethod
    def for_model(cls, model, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> "ModelCache":
        """Fresh caches for ``model``; ``kv_bits`` (4 or 8) quantizes the attention KV."""
        if kv_bits not in (None, 4, 8):
            raise ValueError(f"kv_bits must be 4 or 8 (or None), got {kv_bits}")

        def kv():
            if kv_bits is None:
                return KVCache()
            return QuantizedKVCache(group_size=kv_group_size, bits=kv_bits)

        layers = [ArraysCache(size=2) if layer.is_linear else kv() for layer in model.layers]
        mtp = [kv() for _ in model.mtp.layers] if model.has_mtp else []
        return cls(layers, mtp)

    @property
    def offset(self) -> int:
        """Number of tokens processed so far."""
        for c in self:
            if hasattr(c, "offset"):
                return c.offset
        return 0
