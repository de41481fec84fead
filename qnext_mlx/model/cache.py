"""The per-model cache for incremental decoding.

:class:`ModelCache` is a list with one mlx-lm cache per decoder layer (an
``ArraysCache(size=2)`` holding conv + recurrent state for Gated DeltaNet
layers, a ``KVCache`` / ``QuantizedKVCache`` for attention layers), so mlx-lm's
generation helpers accept it as they are, plus the MTP head's KV caches. On top
of mlx-lm it adds what Qwen3-Next needs:

* the token ids it has seen and the offset (DeltaNet layers have no offset of
  their own; the model reports each call's ids through :meth:`ModelCache.record_tokens`);
* :meth:`~ModelCache.snapshot` / :meth:`~ModelCache.restore` of the whole state
  (MTP rollback, chat reuse, interrupt safety);
* :meth:`~ModelCache.save` / :meth:`~ModelCache.load` to safetensors, refusing a
  file made by another model;
* prompt reuse (:meth:`~ModelCache.reuse`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from ..atomic import atomic_path
from ..errors import CacheError

CACHE_FORMAT = "qnext-mlx-prompt-cache"
CACHE_FORMAT_VERSION = 1
# Config fields that do not change what the cache holds (weight precision).
_NOT_ARCHITECTURE = ("raw", "quantization")


def config_fingerprint(config) -> str:
    """Hash of the architecture fields of a :class:`ModelConfig` (16 hex digits).

    Weight quantization is left out: a cache made with the 4-bit conversion of a
    model holds the same kind of state as one made with its bf16 original.
    """
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_ARCHITECTURE}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """Hash of the final norm weight (16 hex digits): tells two fine-tunes of one
    architecture apart. Rounded to bfloat16 first so that a float32 and a bf16
    copy of the same weights agree; the norm is never quantized."""
    w = model.model.norm.weight.astype(mx.bfloat16).astype(mx.float32)
    return hashlib.sha256(np.array(w).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------ snapshots
@dataclass(eq=False)
class CacheSnapshot:
    """The whole state of a :class:`ModelCache` at one point (see :meth:`ModelCache.snapshot`).

    Attributes:
        offset: number of tokens processed at the snapshot.
        token_chunks: the token ids recorded so far, as ``[B, L_i]`` MLX arrays.
        layers: per layer, ``("linear", [conv, recurrent])`` or
            ``("kv", keys, values, offset)`` (keys/values as held by the mlx-lm cache:
            arrays ``[B, n_kv_heads, capacity, head_dim]``, or (packed, scales, biases)
            tuples for a quantized cache).
        mtp: the same for the MTP head's KV caches.
    """

    offset: int
    token_chunks: Tuple[mx.array, ...]
    layers: Tuple[tuple, ...]
    mtp: Tuple[tuple, ...]
    _token_list: Optional[List[int]] = field(default=None, repr=False)  # tokens, once asked for

    @property
    def tokens(self) -> List[int]:
        """Token ids processed up to the snapshot (batch row 0 only; batch must be 1)."""
        if self._token_list is None:
            self._token_list = _tokens_to_list(self.token_chunks)
        return self._token_list


def _tokens_to_list(chunks: Sequence[mx.array]) -> List[int]:
    if not chunks:
        return []
    ids = mx.concatenate(list(chunks), axis=1) if len(chunks) > 1 else chunks[0]
    if ids.shape[0] != 1:
        raise ValueError(f"token ids are tracked for batch size 1 only, cache has batch {ids.shape[0]}")
    return ids[0].tolist()


def _capture(c) -> tuple:
    if isinstance(c, ArraysCache):
        return ("linear", list(c.cache))
    return ("kv", c.keys, c.values, c.offset)


def _apply(c, entry: tuple) -> None:
    if entry[0] == "linear":
        c.cache = list(entry[1])
        c.left_padding = c.lengths = None
    else:
        _, c.keys, c.values, c.offset = entry


def _detach_prefix(x, n: int):
    """A new array object holding the first ``n`` positions of a KV buffer (or tuple)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(a[..., :n, :] for a in x)
    return x[..., :n, :]


# ---------------------------------------------------------------------- cache
class ModelCache(list):
    """Per-layer caches of one model (list order = layer order) and its MTP caches.

    Elements are mlx-lm caches: ``ArraysCache(size=2)`` = ``[conv_state [B, K-1, conv_dim],
    recurrent_state [B, Hv, Dv, Dk]]`` for DeltaNet layers, ``KVCache`` or
    ``QuantizedKVCache`` (``kv_bits``) for attention layers. ``mtp`` is a list of KV
    caches for the MTP head (its offsets are the MTP code's business).

    The cache also records every token id fed through the model with it
    (:meth:`record_tokens`, called by ``Model.__call__``), so it knows its
    :attr:`offset` and :attr:`tokens` even for a model whose layers are all DeltaNet.
    """

    def __init__(
        self,
        layers=(),
        mtp: Optional[List] = None,
        *,
        kv_bits: Optional[int] = None,
        kv_group_size: int = 64,
        fingerprint: Optional[Dict[str, str]] = None,
        max_checkpoints: int = 3,
    ):
        super().__init__(layers)
        self.mtp = mtp or []
        self.kv_bits = kv_bits
        self.kv_group_size = kv_group_size
        # {"config": ..., "weights": ...}: identifies the model in saved files.
        self.fingerprint = fingerprint
        self.max_checkpoints = max_checkpoints
        # Snapshots kept for prompt reuse (most recent last); see keep_checkpoint().
        self.checkpoints: List[CacheSnapshot] = []
        self._token_chunks: List[mx.array] = []
        self._offset = 0
        # Every snapshot still alive: restoring or trimming below one of them
        # must not let later writes land in a KV buffer that snapshot shares.
        self._snapshots: "weakref.WeakSet[CacheSnapshot]" = weakref.WeakSet()

    @classmethod
    def for_model(cls, model, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> "ModelCache":
        """Fresh caches for ``model``; ``kv_bits`` (4 or 8) quantizes the attention KV
        in groups of ``kv_group_size`` along the head dim (32, 64 or 128)."""
        if kv_bits not in (None, 4, 8):
            raise ValueError(f"kv_bits must be 4 or 8 (or None), got {kv_bits}")
        if kv_bits is not None:
            if kv_group_size not in (32, 64, 128):
                raise ValueError(f"kv_group_size must be 32, 64 or 128, got {kv_group_size}")
            if model.config.head_dim % kv_group_size:
                raise ValueError(f"kv_group_size {kv_group_size} does not divide the head dim {model.config.head_dim}")

        def kv():
            if kv_bits is None:
                return KVCache()
            return QuantizedKVCache(group_size=kv_group_size, bits=kv_bits)

        layers = [ArraysCache(size=2) if layer.is_linear else kv() for layer in model.layers]
        mtp = [kv() for _ in model.mtp.layers] if model.has_mtp else []
        fingerprint = {"config": config_fingerprint(model.config), "weights": weights_fingerprint(model)}
        return cls(layers, mtp, kv_bits=kv_bits, kv_group_size=kv_group_size, fingerprint=fingerprint)

    # ------------------------------------------------------------- tokens
    def record_tokens(self, ids: mx.array) -> None:
        """Note that ``ids`` (``[B, L]`` or ``[L]``) went through the model with this cache.

        Kept lazily as MLX arrays (no device sync on the decode path).
        """
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        self._token_chunks.append(ids.astype(mx.int32))
        self._offset += ids.shape[1]
        if len(self._token_chunks) > 256:  # keep the list short during long decodes
            self._token_chunks = [mx.concatenate(self._token_chunks, axis=1)]

    @property
    def offset(self) -> int:
        """Number of tokens processed so far."""
        return self._offset

    @property
    def tokens(self) -> List[int]:
        """The token ids processed so far (batch size 1)."""
        if len(self._token_chunks) > 1:
            self._token_chunks = [mx.concatenate(self._token_chunks, axis=1)]
        return _tokens_to_list(self._token_chunks)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layer states and KV buffers (allocated capacity, MTP included)."""
        total = 0
        for c in list(self) + list(self.mtp):
            if isinstance(c, ArraysCache):
                total += c.nbytes
            elif c.keys is not None:
                total += c.nbytes
        return total

    @property
    def has_linear_state(self) -> bool:
        """True when some DeltaNet layer holds state (which cannot be trimmed)."""
        return any(isinstance(c, ArraysCache) and not c.empty() for c in self)

    # --------------------------------------------------- snapshot / restore
    def snapshot(self) -> CacheSnapshot:
        """Capture the whole state (all layers, MTP caches, tokens, offset).

        Cheap: it keeps references, no copies. MLX arrays are values, except that
        an mlx-lm KV cache writes new positions into its buffer object in place;
        positions below the snapshot's offset are never written again unless the
        cache is rewound below it, and :meth:`restore` / :meth:`trim_kv` then give
        the live cache a private buffer (one copy) while such a snapshot is alive.
        So a snapshot stays valid whatever happens to the cache afterwards.
        """
        snap = CacheSnapshot(
            offset=self._offset,
            token_chunks=tuple(self._token_chunks),
            layers=tuple(_capture(c) for c in self),
            mtp=tuple(_capture(c) for c in self.mtp),
        )
        self._snapshots.add(snap)
        return snap

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Put the cache back to ``snapshot`` (taken from this cache)."""
        if len(snapshot.layers) != len(self) or len(snapshot.mtp) != len(self.mtp):
            raise ValueError("snapshot was taken from a cache with a different layer layout")
        for c, entry in zip(self, snapshot.layers):
            _apply(c, entry)
        for c, entry in zip(self.mtp, snapshot.mtp):
            _apply(c, entry)
        self._token_chunks = list(snapshot.token_chunks)
        self._offset = snapshot.offset
        self._protect_snapshots()

    def adopt(self, snapshot: CacheSnapshot) -> None:
        """Put this cache in the state of ``snapshot`` taken from *another* cache (a shared
        prefix pool): like :meth:`restore`, but the attention KV is copied by reference
        into new array objects, so that writing on from here never touches the buffers
        ``snapshot`` (and whoever else adopted it) still reads."""
        if len(snapshot.layers) != len(self) or len(snapshot.mtp) != len(self.mtp):
            raise ValueError("snapshot was taken from a cache with a different layer layout")
        for group, entries in ((self, snapshot.layers), (self.mtp, snapshot.mtp)):
            for c, entry in zip(group, entries):
                if entry[0] == "kv":
                    _, keys, values, offset = entry
                    entry = ("kv", _detach_prefix(keys, offset), _detach_prefix(values, offset), offset)
                _apply(c, entry)
        self._token_chunks = list(snapshot.token_chunks)
        self._offset = snapshot.offset

    def set_state(self, layers: Sequence, tokens: Sequence[int]) -> None:
        """Replace the layer caches with ``layers`` (one per decoder layer, as mlx-lm caches)
        and the token record with ``tokens`` (what they hold); the MTP caches are kept.
        For states computed elsewhere (a batch row taken back into a one-row cache)."""
        if len(layers) != len(self):
            raise ValueError(f"{len(layers)} layer caches for a model of {len(self)} layers")
        for i, c in enumerate(layers):
            self[i] = c
        ids = mx.array([list(tokens)], dtype=mx.int32) if len(tokens) else None
        self._token_chunks = [ids] if ids is not None else []
        self._offset = len(tokens)
        self._protect_snapshots()

    def _protect_snapshots(self) -> None:
        """After a rewind: detach KV buffers shared with a live snapshot that reaches further."""
        alive = list(self._snapshots)
        for group, attr in ((self, "layers"), (self.mtp, "mtp")):
            for i, c in enumerate(group):
                if isinstance(c, ArraysCache) or c.keys is None:
                    continue
                for snap in alive:
                    entry = getattr(snap, attr)[i]
                    if entry[3] > c.offset and entry[1] is c.keys:
                        c.keys = _detach_prefix(c.keys, c.offset)
                        c.values = _detach_prefix(c.values, c.offset)
                        break

    def reset(self) -> None:
        """Forget all processed tokens (fresh layer caches; checkpoints are kept)."""
        for i, c in enumerate(self):
            self[i] = _fresh_like(c)
        self.mtp = [_fresh_like(c) for c in self.mtp]
        self._token_chunks = []
        self._offset = 0

    def trim_kv(self, n: int) -> int:
        """Drop the last ``n`` tokens from the attention KV caches and the token record.

        DeltaNet states are left as they are: a recurrent state cannot be rewound,
        so the caller must put the DeltaNet layers' state for the new offset in place
        itself (e.g. speculative decoding with per-step states). MTP caches are not
        touched. Returns the number of tokens trimmed.
        """
        n = max(0, min(n, self._offset))
        if n == 0:
            return 0
        for c in self:
            if not isinstance(c, ArraysCache):
                c.trim(n)
        self._offset -= n
        ids = mx.concatenate(self._token_chunks, axis=1)[:, : self._offset] if self._token_chunks else None
        self._token_chunks = [ids] if ids is not None and self._offset else []
        self._protect_snapshots()
        return n

    def is_trimmable(self) -> bool:
        """True when :meth:`trim` can work: no DeltaNet layer holds state."""
        return not self.has_linear_state

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens; only for caches without DeltaNet state.

        A Gated DeltaNet state cannot be rewound: use :meth:`snapshot` /
        :meth:`restore` instead (or :meth:`trim_kv` for the KV part alone).
        """
        if self.has_linear_state:
            raise ValueError("a DeltaNet state cannot be trimmed; restore a snapshot instead")
        return self.trim_kv(n)

    # ------------------------------------------------------- prompt reuse
    def keep_checkpoint(self) -> CacheSnapshot:
        """Snapshot the current state and keep it for :meth:`reuse` (the oldest is dropped)."""
        snap = self.snapshot()
        if self.max_checkpoints > 0:
            keep = [c for c in self.checkpoints if c.offset != snap.offset]
            self.checkpoints = keep[max(0, len(keep) - self.max_checkpoints + 1) :] + [snap]
        return snap

    def reuse(self, prompt: Sequence[int]) -> int:
        """Prepare the cache for ``prompt``; returns how many leading prompt tokens it
        already holds, so only ``prompt[n:]`` must be processed (at least one token
        always remains, since the next token needs the last prompt position's logits).

        A Gated DeltaNet state is a summary of *all* tokens seen and cannot be
        trimmed back to an earlier position, so only exact prefixes can be reused:

        1. the prompt starts with all tokens of the current state: keep it;
        2. else the prompt starts with the tokens of a kept checkpoint
           (:meth:`keep_checkpoint`, e.g. the end of a previous prompt): restore
           the longest such checkpoint;
        3. else (attention-only model) trim the KV caches to the common prefix;
        4. else start again from an empty cache.
        """
        n, plan = self._plan_reuse(prompt)
        if plan == "trim":
            self.trim_kv(self._offset - n)
        elif isinstance(plan, CacheSnapshot):
            self.restore(plan)
            self.checkpoints.remove(plan)  # most recently used last: dropped last
            self.checkpoints.append(plan)
        elif plan == "reset" and self._offset:
            self.reset()
        return n

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` :meth:`reuse` would reuse (the cache is not changed)."""
        return self._plan_reuse(prompt)[0]

    def _plan_reuse(self, prompt: Sequence[int]):
        """``(n, plan)``: plan is "keep", "trim", "reset" or the checkpoint to restore."""
        prompt = list(prompt)
        limit = len(prompt) - 1
        current = self.tokens
        if 0 < len(current) <= limit and prompt[: len(current)] == current:
            return len(current), "keep"  # a prefix of the prompt: the longest reuse there is
        best = None
        for snap in self.checkpoints:
            if 0 < snap.offset <= limit and (best is None or snap.offset > best.offset):
                if prompt[: snap.offset] == snap.tokens:
                    best = snap
        if not self.has_linear_state and self._offset:
            common = _common_prefix(current, prompt, limit)
            if common and (best is None or common > best.offset):
                return common, "trim"
        if best is not None:
            return best.offset, best
        return 0, "reset"

    # -------------------------------------------------------- save / load
    def _prefix_checkpoints(self) -> List[CacheSnapshot]:
        """Kept checkpoints whose state is a prefix of the current one: same tokens and
        the same KV values below their offset (so a file can store the KV once)."""
        live_tokens = self.tokens
        out = []
        for snap in self.checkpoints:
            if not 0 < snap.offset <= self._offset or snap.tokens != live_tokens[: snap.offset]:
                continue
            pairs = list(zip(self, snap.layers)) + list(zip(self.mtp, snap.mtp))
            if all(_same_kv_prefix(c, entry) for c, entry in pairs):
                out.append(snap)
        return out

    def save(self, path: str | os.PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
        """Write the state to a safetensors file (atomically: temp file, then rename).

        The metadata identifies the model (config and weights fingerprints), the
        format version and the KV quantization, so :meth:`load` can refuse a file
        from another model. Kept checkpoints that are prefixes of the current state
        are saved too (their DeltaNet states; the KV is the current one's prefix),
        so a later run can reuse them.
        """
        if self.fingerprint is None:
            raise ValueError("this cache does not know its model; build it with model.make_cache()")
        arrays: Dict[str, mx.array] = {}
        for prefix, group in (("layers", self), ("mtp", self.mtp)):
            for i, c in enumerate(group):
                if isinstance(c, ArraysCache):
                    _put_linear(arrays, f"{prefix}.{i}", c.cache)
                elif c.keys is not None and c.offset > 0:
                    for name, x in (("keys", c.keys), ("values", c.values)):
                        x = _detach_prefix(x, c.offset)
                        if isinstance(x, tuple):
                            for j, part in enumerate(x):
                                arrays[f"{prefix}.{i}.{name}.{j}"] = part
                        else:
                            arrays[f"{prefix}.{i}.{name}"] = x
        if self._offset:
            arrays["tokens"] = mx.concatenate(self._token_chunks, axis=1)
        checkpoints = self._prefix_checkpoints()
        for k, snap in enumerate(checkpoints):
            for i, entry in enumerate(snap.layers):
                if entry[0] == "linear":
                    _put_linear(arrays, f"checkpoints.{k}.layers.{i}", entry[1])
        meta = {
            "format": CACHE_FORMAT,
            "format_version": str(CACHE_FORMAT_VERSION),
            "config_fingerprint": self.fingerprint["config"],
            "weights_fingerprint": self.fingerprint["weights"],
            "offset": str(self._offset),
            "kv_bits": str(self.kv_bits or 0),
            "kv_group_size": str(self.kv_group_size),
            "num_layers": str(len(self)),
            "num_mtp_layers": str(len(self.mtp)),
            "mtp_offsets": json.dumps([c.offset for c in self.mtp]),
            "checkpoints": json.dumps(
                [{"offset": s.offset, "mtp_offsets": [e[3] for e in s.mtp]} for s in checkpoints]
            ),
        }
        meta.update(metadata or {})
        try:
            with atomic_path(path, ".safetensors") as tmp:
                mx.save_safetensors(str(tmp), arrays, metadata=meta)
        except OSError as e:
            raise CacheError(f"cannot write prompt cache {path}: {e.strerror or e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, model) -> "ModelCache":
        """Read a cache written by :meth:`save` for ``model`` (with its checkpoints).

        Raises :class:`CacheError` (one line) when the file is missing, not a
        qnext-mlx cache, of another format version, or made by another model.
        """
        path = Path(path)
        if not path.is_file():
            raise CacheError(f"prompt cache {path} does not exist")
        try:
            arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        except Exception:  # MLX raises RuntimeError/ValueError for unreadable files
            raise CacheError(f"{path} is not a readable safetensors file; delete it to start a new cache") from None
        if meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{path} is not a qnext-mlx prompt cache")
        if meta.get("format_version") != str(CACHE_FORMAT_VERSION):
            raise CacheError(
                f"{path} has cache format version {meta.get('format_version')}, this qnext-mlx reads "
                f"{CACHE_FORMAT_VERSION}; delete it to start a new cache"
            )
        if meta.get("config_fingerprint") != config_fingerprint(model.config):
            raise CacheError(
                f"{path} was made by a model with another architecture/config; use the model it was made "
                f"with, or delete the file to start a new cache"
            )
        if meta.get("weights_fingerprint") != weights_fingerprint(model):
            raise CacheError(
                f"{path} was made by a model with other weights; use the model it was made with, "
                f"or delete the file to start a new cache"
            )
        try:
            kv_bits = int(meta["kv_bits"]) or None
            cache = cls.for_model(model, kv_bits=kv_bits, kv_group_size=int(meta["kv_group_size"]))
            offset = int(meta["offset"])
            mtp_offsets = json.loads(meta["mtp_offsets"])
            for prefix, group, offsets in (("layers", cache, None), ("mtp", cache.mtp, mtp_offsets)):
                for i, c in enumerate(group):
                    if isinstance(c, ArraysCache):
                        c.cache = _get_linear(arrays, f"{prefix}.{i}")
                        continue
                    if kv_bits:
                        keys = [arrays.get(f"{prefix}.{i}.keys.{j}") for j in range(3)]
                        values = [arrays.get(f"{prefix}.{i}.values.{j}") for j in range(3)]
                        keys = None if keys[0] is None else tuple(keys)
                        values = None if values[0] is None else tuple(values)
                    else:
                        keys, values = arrays.get(f"{prefix}.{i}.keys"), arrays.get(f"{prefix}.{i}.values")
                    c.keys, c.values = keys, values
                    c.offset = offsets[i] if offsets is not None else (offset if keys is not None else 0)
            tokens = None
            if offset:
                tokens = arrays["tokens"]
                if tokens.ndim != 2 or tokens.shape[1] != offset:
                    raise ValueError("token record does not match the offset")
                cache._token_chunks = [tokens]
                cache._offset = offset
            for k, info in enumerate(json.loads(meta.get("checkpoints", "[]"))):
                o = int(info["offset"])
                layers = tuple(
                    ("linear", _get_linear(arrays, f"checkpoints.{k}.layers.{i}"))
                    if isinstance(c, ArraysCache)
                    else ("kv", c.keys, c.values, o)
                    for i, c in enumerate(cache)
                )
                mtp = tuple(("kv", c.keys, c.values, int(m)) for c, m in zip(cache.mtp, info["mtp_offsets"]))
                snap = CacheSnapshot(offset=o, token_chunks=(tokens[:, :o],), layers=layers, mtp=mtp)
                cache.checkpoints.append(snap)
                cache._snapshots.add(snap)
        except (KeyError, ValueError, TypeError, IndexError):
            raise CacheError(f"{path} is a damaged qnext-mlx prompt cache; delete it to start a new cache") from None
        return cache


def _put_linear(arrays: Dict[str, mx.array], prefix: str, state: Sequence[Optional[mx.array]]) -> None:
    for name, a in zip(("conv", "recurrent"), state):
        if a is not None:
            arrays[f"{prefix}.{name}"] = a


def _get_linear(arrays: Dict[str, mx.array], prefix: str) -> List[Optional[mx.array]]:
    return [arrays.get(f"{prefix}.conv"), arrays.get(f"{prefix}.recurrent")]


def _same_kv_prefix(c, entry: tuple) -> bool:
    """Does live cache ``c`` hold snapshot ``entry``'s KV values below its offset?"""
    if entry[0] == "linear":
        return True
    _, keys, values, offset = entry
    if offset == 0 or keys is c.keys:  # shared buffer: never overwritten below a live snapshot
        return offset <= c.offset
    if offset > c.offset or keys is None or c.keys is None:
        return False
    pairs = [(keys, c.keys), (values, c.values)]
    for snap_x, live_x in pairs:
        a, b = _detach_prefix(snap_x, offset), _detach_prefix(live_x, offset)
        for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
            if not mx.array_equal(x, y).item():
                return False
    return True


def _fresh_like(c):
    if isinstance(c, ArraysCache):
        return ArraysCache(size=len(c.cache))
    if isinstance(c, QuantizedKVCache):
        return QuantizedKVCache(group_size=c.group_size, bits=c.bits)
    return type(c)()


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n
