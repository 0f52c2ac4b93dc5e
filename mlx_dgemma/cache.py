"""The prefix KV cache that the encoder writes and the decoder only reads.

Full-attention layers keep every token (mlx-lm's ``KVCache``, which grows in
pre-allocated steps). Sliding layers keep only the last ``sliding_window - 1`` tokens,
exactly as the reference's ``DynamicSlidingWindowLayer``: that is all a future query
can see through a window of ``sliding_window``, and all the decoder is shown.
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
    """Keeps the last ``window - 1`` tokens; ``offset`` counts every token seen."""

    def __init__(self, window: int):
        self.window = window
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.version = 0  # see FullCache.version

    def prefix(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        return self.keys, self.values

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store new K/V; return the cached window followed by the new K/V.

        The encoder masks the returned keys with the sliding window itself.
        """
        self.offset += keys.shape[2]
        self.version += 1
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        keep = self.window - 1
        self.keys = keys[..., -keep:, :] if keep > 0 else keys[..., :0, :]
        self.values = values[..., -keep:, :] if keep > 0 else values[..., :0, :]
        return keys, values

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
        return False

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

    def copy(self) -> "PrefixCache":
        """A copy that can be extended without changing this one (arrays are immutable)."""
        out = PrefixCache()
        for c in self:
            if isinstance(c, SlidingCache):
                n = SlidingCache(c.window)
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
