"""Encoder caches kept between requests, keyed by the tokens they hold.

A multi-turn conversation re-sends its whole history each turn. Each entry here is an
immutable snapshot of a ``PrefixCache`` after encoding exactly ``tokens``; a request
whose tokens START WITH an entry's tokens can continue from (a copy of) that entry and
encode only the rest.

Only exact prefixes are reusable: sliding-window layers keep just their last
``sliding_window - 1`` tokens, so a cache cannot be rolled back to an earlier position.
That is why the scheduler snapshots several points of one request (see
``Scheduler``): the end of the rendered history (before the generation prompt), the end
of the prompt, and the end of the reply. The chat template of the next turn may render
the assistant's reply differently from the tokens the model committed (thinking
stripped, an empty thought channel that the generation prompt prefilled): the snapshot
at the end of the history still matches then.

Memory is bounded by ``PrefixCache.nbytes`` summed over entries; the least recently
used entries are evicted first. Entries are never mutated once stored (``lookup``
returns a ``.copy()``, which extends into new arrays).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..cache import PrefixCache


@dataclass
class Entry:
    tokens: np.ndarray  # int32 [T]: exactly what the cache holds
    cache: PrefixCache  # snapshot; never appended to
    nbytes: int
    hits: int = 0
    created: float = field(default_factory=time.monotonic)


class PromptCacheStore:
    """LRU store of encoder-cache snapshots, bounded in bytes.

    Thread-safe, but the scheduler thread is its only MLX user; the HTTP side only
    reads stats and may clear it.
    """

    def __init__(self, max_bytes: int, min_tokens: int = 1):
        self.max_bytes = int(max_bytes)
        self.min_tokens = int(min_tokens)
        self._entries: "OrderedDict[int, Entry]" = OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        self.lookups = 0
        self.hits = 0
        self.reused_tokens = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int]) -> Tuple[int, Optional[PrefixCache]]:
        """(n, cache): the longest stored entry whose tokens are a prefix of ``tokens``,
        as an extendable copy holding ``n`` tokens; (0, None) when none matches."""
        if not self.enabled:
            return 0, None
        toks = np.asarray(tokens, dtype=np.int32)
        with self._lock:
            self.lookups += 1
            best_id, best = None, None
            for eid, e in self._entries.items():
                n = e.tokens.shape[0]
                if n > toks.shape[0] or (best is not None and n <= best.tokens.shape[0]):
                    continue
                if np.array_equal(e.tokens, toks[:n]):
                    best_id, best = eid, e
            if best is None:
                return 0, None
            self._entries.move_to_end(best_id)
            best.hits += 1
            self.hits += 1
            n = int(best.tokens.shape[0])
            self.reused_tokens += n
            return n, best.cache.copy()

    def insert(self, tokens: Sequence[int], cache: PrefixCache) -> bool:
        """Store a snapshot of ``cache`` (which must hold exactly ``tokens``).

        The caller may keep extending ``cache``: the store keeps its own ``.copy()``.
        Returns False when the entry is not kept (too short, or bigger than the store).
        """
        toks = np.asarray(tokens, dtype=np.int32).copy()
        if not self.enabled or toks.shape[0] < self.min_tokens:
            return False
        if cache.offset != toks.shape[0]:
            raise ValueError(f"prompt cache: cache holds {cache.offset} tokens, key has {toks.shape[0]}")
        nbytes = cache.nbytes
        if nbytes > self.max_bytes:
            return False
        snap = cache.copy()
        with self._lock:
            for eid, e in self._entries.items():
                if e.tokens.shape[0] == toks.shape[0] and np.array_equal(e.tokens, toks):
                    self._entries.move_to_end(eid)  # same tokens: keep the older snapshot
                    return True
            self._entries[self._next_id] = Entry(toks, snap, nbytes)
            self._next_id += 1
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.nbytes,
                "max_bytes": self.max_bytes,
                "lookups": self.lookups,
                "hits": self.hits,
                "reused_tokens": self.reused_tokens,
                "evictions": self.evictions,
            }

    def entry_lengths(self) -> List[int]:
        with self._lock:
            return [int(e.tokens.shape[0]) for e in self._entries.values()]
