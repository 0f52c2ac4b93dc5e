"""The prefix KV cache that the encoder writes and the decoder only reads.

Full-attention layers keep every token (mlx-lm's ``KVCache``, which grows in
pre-allocated steps). Sliding layers keep only the last ``sliding_window - 1`` tokens,
exactly as the reference's ``DynamicSlidingWindowLayer``: that is all a future query
can see through a window of ``sliding_window``, and all the decoder is shown.

Trimming (verified decoding drops a rejected draft tail): a full layer just moves its
offset back. A sliding layer cannot bring back tokens that scrolled out of its window,
so ``PrefixCache.reserve_trim(n)`` makes its sliding layers keep up to ``n`` tokens of
history beyond the window; ``trim(k <= n)`` then restores exactly the state that
encoding the kept tokens alone would have left. The decoder and the encoder still see
only the last ``sliding_window - 1`` tokens.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class FullCache(KVCache):
    """Grows without bound; ``prefix()`` is what the decoder attends to.

    ``version`` changes whenever the stored K/V may have changed (append, trim, state
    load): the decoder keeps per-block work (prefix views, compiled step) keyed by it.
    """

    version = 0

    @property
    def state(self):
        return super().state

    @state.setter
    def state(self, v):
        KVCache.state.fset(self, v)
        self.version += 1

    def trim(self, n):
        self.version += 1
        return super().trim(n)

    def prefix(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store new K/V; return every cached K/V including the new ones."""
        self.version += 1
        return self.update_and_fetch(keys, values)


class SlidingCache:
    """Keeps the last ``window - 1`` tokens (plus ``history`` more for ``trim``);
    ``offset`` counts every token seen."""

    def __init__(self, window: int, history: int = 0):
        self.window = window
        self.history = history  # extra tokens kept so that trim() can restore them
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.version = 0  # see FullCache.version

    def _last(self, n: int) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        if self.keys is None or self.keys.shape[2] <= n:
            return self.keys, self.values
        start = self.keys.shape[2] - n
        return self.keys[..., start:, :], self.values[..., start:, :]

    def prefix(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        """The last ``window - 1`` tokens: what the decoder attends to."""
        return self._last(self.window - 1)

    @property
    def length(self) -> int:
        """Tokens the decoder sees (at most ``window - 1``)."""
        return 0 if self.keys is None else min(self.keys.shape[2], self.window - 1)

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store new K/V; return the cached window followed by the new K/V.

        The encoder masks the returned keys with the sliding window itself.
        """
        self.offset += keys.shape[2]
        self.version += 1
        old_k, old_v = self._last(self.window - 1)
        if self.keys is not None:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
            if old_k is self.keys:  # no history beyond the window: the same arrays
                keys, values = all_k, all_v
            else:
                keys = mx.concatenate([old_k, keys], axis=2)
                values = mx.concatenate([old_v, values], axis=2)
        else:
            all_k, all_v = keys, values
        keep = max(self.window - 1, 0) + self.history
        start = max(all_k.shape[2] - keep, 0)
        self.keys, self.values = all_k[..., start:, :], all_v[..., start:, :]
        return keys, values

    def trimmable(self) -> int:
        """How many of the last tokens ``trim`` can drop."""
        stored = 0 if self.keys is None else self.keys.shape[2]
        if stored >= self.offset:  # nothing has scrolled out yet
            return self.offset
        # after dropping n, the window's min(offset - n, window - 1) tokens must remain
        return max(stored - max(self.window - 1, 0), 0)

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (at most ``trimmable()``); returns ``n``."""
        if n > self.trimmable():
            raise ValueError(f"sliding cache: cannot trim {n} tokens, only {self.trimmable()} are kept "
                             f"beyond the window (PrefixCache.reserve_trim)")
        if n:
            end = self.keys.shape[2] - n
            self.keys, self.values = self.keys[..., :end, :], self.values[..., :end, :]
            self.offset -= n
            self.version += 1
        return n

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v
        self.version += 1

    @property
    def meta_state(self):
        return tuple(map(str, (self.window, self.offset)))

    @meta_state.setter
    def meta_state(self, v):
        self.window, self.offset = map(int, v)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def is_trimmable(self) -> bool:
        return self.trimmable() > 0

    def empty(self) -> bool:
        return self.keys is None


class PrefixCache(list):
    """One cache per layer, plus the sequence length the encoder has written."""

    @property
    def offset(self) -> int:
        return self[0].offset if self else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    @property
    def version(self) -> tuple:
        """Changes whenever any layer's stored K/V may have changed."""
        return tuple(c.version for c in self)

    def reserve_trim(self, n: int) -> None:
        """Let ``trim`` drop up to ``n`` tokens from here on: sliding layers keep ``n``
        tokens of history beyond their window (the memory of ``n`` more tokens each)."""
        for c in self:
            if isinstance(c, SlidingCache):
                c.history = max(c.history, int(n))

    def trimmable(self) -> int:
        """How many of the last tokens ``trim`` can drop now."""
        return min((c.trimmable() if isinstance(c, SlidingCache) else c.offset) for c in self) if self else 0

    def trim(self, n: int) -> None:
        """Drop the last ``n`` tokens of every layer, as if they had never been encoded.

        All or nothing: raises ValueError (and changes nothing) when a sliding layer has
        not kept enough history (see ``reserve_trim``).
        """
        if n < 0 or n > self.trimmable():
            raise ValueError(f"cannot trim {n} tokens from a cache of {self.offset}: at most {self.trimmable()} "
                             f"can be dropped (sliding layers keep the history reserve_trim asked for)")
        if n:
            for c in self:
                c.trim(n)

    def split_rows(self) -> List["PrefixCache"]:
        """One batch-1 cache per batch row (slices; arrays are immutable)."""
        B = next((c.keys.shape[0] for c in self if c.keys is not None), 1)
        rows = []
        for b in range(B):
            out = PrefixCache()
            for c in self:
                k, v = c.prefix() if isinstance(c, FullCache) else (c.keys, c.values)
                if isinstance(c, SlidingCache):
                    n = SlidingCache(c.window, c.history)
                else:
                    n = FullCache()
                if k is not None:
                    n.keys, n.values = k[b : b + 1], v[b : b + 1]
                n.offset = c.offset
                out.append(n)
            rows.append(out)
        return rows

    def copy(self) -> "PrefixCache":
        """A copy that can be extended without changing this one (arrays are immutable)."""
        out = PrefixCache()
        for c in self:
            if isinstance(c, SlidingCache):
                n = SlidingCache(c.window, c.history)
                n.keys, n.values, n.offset = c.keys, c.values, c.offset
            else:
                n = FullCache()
                if c.keys is not None:
                    n.keys, n.values = c.prefix()
                n.offset = c.offset
            out.append(n)
        return out


def make_prefix_cache(layer_is_full: List[bool], sliding_window: int) -> PrefixCache:
    return PrefixCache(FullCache() if full else SlidingCache(sliding_window) for full in layer_is_full)
