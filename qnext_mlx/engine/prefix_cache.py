"""One pool of cache snapshots for every request: prefix reuse that follows the conversation.

A Gated DeltaNet state summarises every token seen and cannot be trimmed back, so a prompt
can reuse only a state taken at an exact prefix of it. The engine therefore snapshots each
sequence at the places later prompts are likely to share: the message boundaries of the
rendered prompt (the end of the system prompt and tools, each assistant header), the last
prompt token, and the end of each generated reply. A later prompt restores the longest
snapshot whose tokens start it and prefills only the rest: with the real templates, turn k
then prefills only what the template changed or added since turn k-1 (the Thinking
template re-renders earlier replies without their reasoning: its reuse point is the
previous turn's assistant header).

A snapshot keeps the DeltaNet states (about 75 MB for the 80B, whatever the length) and
the attention KV *by reference*: snapshots of one conversation share its KV buffers. The
pool holds at most ``max_bytes`` (DeltaNet states plus each distinct KV buffer once) and
drops the least recently used snapshots first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..model.cache import CacheSnapshot

__all__ = ["PrefixCache", "PrefixCacheStats"]


@dataclass
class PrefixCacheStats:
    """Counters of a :class:`PrefixCache` (for ``/metrics``): lookups that found a snapshot,
    the prompt tokens they reused, snapshots stored and dropped."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    inserted: int = 0
    evicted: int = 0


def _arrays(entry: tuple) -> List[mx.array]:
    if entry[0] == "linear":
        return [a for a in entry[1] if a is not None]
    keys, values = entry[1], entry[2]
    out = []
    for x in (keys, values):
        if x is None:
            continue
        out.extend(x if isinstance(x, tuple) else [x])
    return out


class PrefixCache:
    """Snapshots by token prefix, least recently used dropped first past ``max_bytes``.

    ``max_entries`` bounds the count as well (None: bytes only). Not thread-safe: the
    engine thread owns it. ``group``: in a parallel run every rank keeps its own pool
    (its share of each state) and drops the same snapshots as the others: a rank's
    budget is ``max_bytes``, checked against the largest pool of the group (an
    ``all_max``; under pipeline parallel the ranks hold different layers).
    """

    def __init__(self, max_bytes: int = 4 << 30, max_entries: Optional[int] = None, group=None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.max_entries = max_entries
        self.group = group if group is not None and group.size() > 1 else None
        # key: the snapshot's tokens as a tuple -> snapshot; most recently used last
        self._entries: "OrderedDict[Tuple[int, ...], CacheSnapshot]" = OrderedDict()
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the pool keeps alive: DeltaNet states, and each KV buffer once."""
        seen: Dict[int, int] = {}
        for snap in self._entries.values():
            for entry in snap.layers + snap.mtp:
                for a in _arrays(entry):
                    seen[id(a)] = a.nbytes
        return sum(seen.values())

    def lookup(self, ids: Sequence[int], limit: Optional[int] = None) -> Optional[CacheSnapshot]:
        """The longest snapshot whose tokens are a prefix of ``ids[:limit]`` (default:
        all but the last token, which must still run to give the next logits), or None.
        A hit becomes the most recently used."""
        ids = list(ids)
        limit = len(ids) - 1 if limit is None else min(limit, len(ids))
        self.stats.lookups += 1
        best: Optional[Tuple[Tuple[int, ...], CacheSnapshot]] = None
        by_length: Dict[int, Tuple[int, ...]] = {}
        for key, snap in self._entries.items():
            n = len(key)
            if n == 0 or n > limit or (best is not None and n <= len(best[0])):
                continue
            prefix = by_length.get(n)
            if prefix is None:
                prefix = by_length[n] = tuple(ids[:n])
            if prefix == key:
                best = (key, snap)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        self.stats.hits += 1
        self.stats.reused_tokens += len(best[0])
        return best[1]

    def insert(self, snapshot: CacheSnapshot) -> None:
        """Keep ``snapshot`` (replacing one of the same tokens), then drop the least
        recently used snapshots until the pool fits its budget."""
        key = tuple(snapshot.tokens)
        if not key:
            return
        self._entries.pop(key, None)
        self._entries[key] = snapshot
        self.stats.inserted += 1
        self._shrink()

    def _group_nbytes(self) -> int:
        if self.group is None:
            return self.nbytes
        largest = mx.distributed.all_max(mx.array([self.nbytes], dtype=mx.int64), group=self.group)
        return int(largest.item())

    def _shrink(self) -> None:
        while self._entries and (
            (self.max_entries is not None and len(self._entries) > self.max_entries)
            or self._group_nbytes() > self.max_bytes
        ):
            self._entries.popitem(last=False)
            self.stats.evicted += 1

    def latest(self) -> Optional[CacheSnapshot]:
        """The most recently stored or used snapshot, or None."""
        return next(reversed(self._entries.values()), None) if self._entries else None

    def clear(self) -> None:
        self._entries.clear()
