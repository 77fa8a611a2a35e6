"""Sliding-window attention with a rolling buffer, and attention sinks.

A cache that keeps every token grows without end. Sliding-window attention
caps it: each token attends only to the ``window`` most recent tokens, itself
included (Mistral 7B; the mask of Hugging Face's ``sliding_window_overlay``:
key j is seen from query i when i - window < j <= i). The cache then needs
exactly ``window`` slots per sequence, used as a **rolling buffer**: the token
at position p goes to slot p mod window, overwriting the one that has just
left the window (mistral-inference's README, "Rolling buffer cache")::

    window = 4, after 6 tokens:   slot  0    1    2    3
                                  pos   4    5    2    3      (0 and 1 were overwritten)

Attention sinks (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): a model
trained with full attention puts a large share of its attention weight on the
first few tokens whatever they say, as a place to park it. Evict them and
perplexity jumps once the text outgrows the window; keep them and it does not.
So the cache keeps the first ``sinks`` tokens for good and rolls the rest::

    window = 6, sinks = 2:        slot  0    1  | 2    3    4    5
                                  pos   0    1  | 8    9    6    7   (a rolling buffer of 4)

Like :class:`kqv.KVCache`, a window cache gives each row of the batch its own
fill level (:meth:`kqv.cache.Cache.select`, :meth:`~kqv.cache.Cache.reset`):
rows that have seen different numbers of tokens have their sinks, slots and
mask apart, and a batch of them decodes together.

``window`` counts every slot, sinks included, so that a cache with and
without sinks holds the same number of tokens; it must be larger than
``sinks`` (at least one slot for the new token).

Positions. Keys are cached already rotated by RoPE at their position in the
text, and queries are rotated at theirs, so a query sees each window key at
its true distance (as in Mistral). The sinks are another matter: at position
10 000 a query would see token 0 at distance 10 000, a distance a model
trained on shorter texts has never seen. StreamingLLM instead numbers the
tokens by their place in the cache (sinks 0 .. s-1, then the window in
order), so that no distance exceeds the cache size. Only differences of
positions enter RoPE's scores, and the window is contiguous and ends at the
query, so this changes one thing only: the sinks sit just before the oldest
window token the query sees. kqv does exactly that, with
``sink_positions="cache"`` (the default): it keeps the sinks' keys as first
rotated and, at each step, rotates them on by the distance they have to move
(RoPE is a rotation, so moving a key is one more rotation), O(sinks) work
instead of re-rotating the whole cache. ``sink_positions="text"`` leaves them
at their true positions. One new token at a time this is StreamingLLM's
scheme exactly; a chunk of T tokens places the sinks before the window of its
first token, so its later tokens see them up to T - 1 positions further away.

Book: the "Serving the cache" chapter (Part IV).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .attention import scaled_dot_product_attention
from .cache import Cache, ModelCache
from .rope import apply_rope, rope_angles

__all__ = [
    "SlidingWindowCache",
    "SlidingWindowKVCache",
    "SlidingWindowLatentCache",
    "window_cache",
    "window_perplexity",
    "window_sweep",
]

SINK_POSITIONS = ("cache", "text")


class SlidingWindowCache(Cache):
    """Named buffers of ``window`` slots along the sequence axis: ``sinks`` kept, the rest a rolling buffer.

    ``update`` returns the held tokens (and, for a chunk of several new
    tokens, the new ones after them, since the chunk's first queries still see
    tokens that its last ones push out); :meth:`attend` applies the mask that
    says which of them each query sees.

    Args:
        shapes: for each buffer, its shape with ``None`` where the sequence axis is.
        window: slots per sequence, sinks included.
        sinks: how many first tokens are kept for good.
        sink_positions: ``"cache"`` (StreamingLLM) or ``"text"``; see :mod:`kqv.window`.
        rope: ``(buffer, first coordinate, theta, interleaved)``: where RoPE
            rotated the keys, to move the sinks; None without RoPE.
        dtype, device: of every buffer.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int | None, ...]],
        *,
        window: int,
        sinks: int = 0,
        sink_positions: str = "cache",
        rope: tuple[str, int, float, bool] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if sinks < 0:
            raise ValueError(f"sinks must be non-negative, got {sinks}")
        if window <= sinks:
            raise ValueError(
                f"window ({window}) must be larger than sinks ({sinks}): the window holds the sinks "
                f"and the most recent tokens, at least the new one"
            )
        if sink_positions not in SINK_POSITIONS:
            raise ValueError(f"sink_positions must be one of {SINK_POSITIONS}, got {sink_positions!r}")
        super().__init__(shapes, max_len=window, dtype=dtype, device=device)
        self.window, self.sinks, self.sink_positions = window, sinks, sink_positions
        self.recent = window - sinks                   # R: the rolling part
        self._seen = [0] * self.num_rows               # per row, tokens seen: its next token's position
        self._rope = rope
        self._mask: torch.Tensor | None = None
        # The sinks' keys as first rotated, to move them from (StreamingLLM positions only).
        self.sink_keys: torch.Tensor | None = None
        if sinks and sink_positions == "cache" and rope is not None:
            name, first, _, _ = rope
            buf, dim = self.buffers[name], self._seq_dims[name]
            shape = list(buf.shape)
            shape[dim], shape[-1] = sinks, shape[-1] - first
            self.sink_keys = torch.zeros(shape, dtype=buf.dtype, device=buf.device)

    # --- what it holds ---------------------------------------------------------------
    @property
    def seen(self) -> int | torch.Tensor:
        """Tokens each selected row has seen, held or not: one int when they agree, else a (B,) tensor."""
        seen = [self._seen[r] for r in self.rows]
        return seen[0] if len(set(seen)) == 1 else torch.tensor(seen, device=self.device)

    @seen.setter
    def seen(self, value: int) -> None:
        for r in self.rows:
            self._seen[r], self.lengths[r] = value, min(value, self.window)

    @property
    def next_position(self) -> int | torch.Tensor:
        """The position of the next token in the text: every token seen, not only those held."""
        return self.seen

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: the window's slots, and the sinks' first keys if kept."""
        extra = 0 if self.sink_keys is None else self.sink_keys.numel() * self.sink_keys.element_size()
        return super().nbytes + extra

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget every token of ``rows`` (default: of every row), seen or held."""
        super().reset(rows)
        for r in range(self.num_rows) if rows is None else self._check_rows(rows):
            self._seen[r] = 0
        self._mask = None

    def slot(self, position: int) -> int:
        """Where the token at ``position`` is stored: its own slot if a sink, else a turn of the rolling buffer."""
        if position < self.sinks:
            return position
        return self.sinks + (position - self.sinks) % self.recent

    def slot_positions(self, seen: int | None = None) -> torch.Tensor:
        """The position of the token in each slot after ``seen`` tokens (default: now), -1 where empty."""
        seen = self.seen if seen is None else seen
        if isinstance(seen, torch.Tensor):
            raise ValueError(f"the selected rows have seen different numbers of tokens, {seen.tolist()}: pass seen")
        s, R = self.sinks, self.recent
        slots = torch.arange(self.window, device=self.device)
        # Rolling slot i holds positions i, i + R, i + 2R, ...: the last of them below `seen`.
        turns = torch.div(seen - 1 - slots, R, rounding_mode="floor")
        rolled = torch.where(turns >= 0, slots + R * turns, -1)
        return torch.where(slots < s, torch.where(slots < seen, slots, -1), rolled)      # (window,)

    # --- filling it ------------------------------------------------------------------
    def _roll(self, new: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Store T new tokens in each selected row and return what the T queries read.

        Rows that have seen equally many tokens have the same slots and the
        same mask, and roll as one batch; a batch whose rows differ rolls each
        such group of rows apart, and pads what they read to the longest.
        """
        T = self._check_new(new)
        rows = self.rows
        groups: dict[int, list[int]] = {}             # tokens seen -> the batch positions of its rows
        for i, r in enumerate(rows):
            groups.setdefault(self._seen[r], []).append(i)
        if len(groups) == 1 and self.every_row:
            # One fill level: roll the buffers themselves (what the queries read are views).
            out, k_pos, q_pos = self._roll_rows(self.buffers, self.sink_keys, new, self._seen[rows[0]], T)
            # One new token sees every key it was given: no mask, so the fused kernel has less to read.
            self._mask = None if T == 1 else self._window_mask(k_pos, q_pos)
        else:
            out = self._roll_groups(new, groups, T)
        for r in rows:
            self._seen[r] += T
            self.lengths[r] = min(self._seen[r], self.window)
        return out

    def _roll_groups(self, new: dict[str, torch.Tensor], groups: dict[int, list[int]], T: int) -> tuple[torch.Tensor, ...]:
        """Roll each group of rows on copies of its rows, write them back; pad and mask what they read."""
        rows, pieces = self.rows, []
        for p0, batch in groups.items():
            pick = torch.tensor(batch, device=self.device)                       # where in the batch
            index = torch.tensor([rows[i] for i in batch], device=self.device)   # which rows of the cache
            buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}
            sink_keys = None if self.sink_keys is None else self.sink_keys.index_select(0, index)
            out, k_pos, q_pos = self._roll_rows(buffers, sink_keys, {n: t.index_select(0, pick) for n, t in new.items()}, p0, T)
            for n, b in buffers.items():
                self.buffers[n].index_copy_(0, index, b)
            if sink_keys is not None:
                self.sink_keys.index_copy_(0, index, sink_keys)
            pieces.append((pick, out, self._window_mask(k_pos, q_pos)))                # mask: (T, S_g)
        S = max(mask.shape[-1] for _, _, mask in pieces)
        self._mask = torch.zeros(len(rows), 1, T, S, dtype=torch.bool, device=self.device)  # (B, 1, T, S)
        padded = []
        for j, (name, t) in enumerate(new.items()):
            dim = self._seq_dims[name]
            shape = list(t.shape)
            shape[dim] = S
            full = torch.zeros(shape, dtype=t.dtype, device=t.device)                  # (B, ..., S, ...)
            for pick, out, _ in pieces:
                part = torch.zeros([len(pick), *shape[1:]], dtype=t.dtype, device=t.device)
                part.narrow(dim, 0, out[j].shape[dim]).copy_(out[j])
                full.index_copy_(0, pick, part)
            padded.append(full)
        for pick, _, mask in pieces:
            self._mask[pick, 0, :, : mask.shape[-1]] = mask
        return tuple(padded)

    def _window_mask(self, k_pos: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """(T, S): each query sees the keys at or before it that are sinks or among its ``recent`` latest."""
        earlier = (k_pos >= 0) & (k_pos <= q_pos.unsqueeze(1))
        return earlier & ((k_pos > q_pos.unsqueeze(1) - self.recent) | (k_pos < self.sinks))

    def _roll_rows(self, buffers, sink_keys, new, p0: int, T: int):
        """Roll rows that have all seen ``p0`` tokens: write T new ones into ``buffers``; return what they read and the positions."""
        q_pos = torch.arange(p0, p0 + T, device=self.device)            # (T,)
        self._move_sinks(buffers, sink_keys, p0)
        if T == 1:
            # The slot it takes holds the token that has just left the window: write, then read in place.
            for name, t in new.items():
                buffers[name].narrow(self._seq_dims[name], self.slot(p0), 1).copy_(t)
            self._keep_sink_keys(sink_keys, new, p0, T)
            held = min(p0 + 1, self.window)
            out = tuple(buffers[n].narrow(self._seq_dims[n], 0, held) for n in new)
            k_pos = self.slot_positions(p0 + 1)[:held]
        else:
            # A chunk's first queries still see tokens that its last ones evict: read, then write.
            held = min(p0, self.window)
            out = tuple(
                torch.cat((buffers[n].narrow(self._seq_dims[n], 0, held), t), dim=self._seq_dims[n])
                for n, t in new.items()
            )
            k_pos = torch.cat((self.slot_positions(p0)[:held], q_pos))
            last = p0 + T - 1
            keep = [p for p in range(p0, p0 + T) if p < self.sinks or p > last - self.recent]
            index = torch.tensor([p - p0 for p in keep], device=self.device)
            slots = torch.tensor([self.slot(p) for p in keep], device=self.device)
            for name, t in new.items():
                buffers[name].index_copy_(self._seq_dims[name], slots, t.index_select(self._seq_dims[name], index))
            self._keep_sink_keys(sink_keys, new, p0, T)
        return out, k_pos, q_pos

    def _rope_part(self, t: torch.Tensor) -> torch.Tensor:
        """The coordinates that RoPE rotated (a latent row's last d_r; all of a key)."""
        return t[..., self._rope[1]:]

    def _keep_sink_keys(self, sink_keys, new: dict[str, torch.Tensor], p0: int, T: int) -> None:
        """Remember the sinks' keys as first rotated, the reference they are moved from."""
        if sink_keys is None or p0 >= self.sinks:
            return
        name = self._rope[0]
        dim, n = self._seq_dims[name], min(self.sinks, p0 + T) - p0
        part = self._rope_part(new[name].narrow(dim, 0, n))
        sink_keys.narrow(dim, p0, n).copy_(part)

    def _move_sinks(self, buffers, sink_keys, p0: int) -> None:
        """Rotate the sinks' keys to sit just before the oldest window token that query p0 sees."""
        if sink_keys is None or p0 < self.window:
            return                                                        # nothing has left the window yet
        name, first, theta, interleaved = self._rope
        dim = self._seq_dims[name]
        shift = p0 + 1 - self.window                                      # oldest seen: p0 - recent + 1 = sinks + shift
        cos, sin = rope_angles(torch.tensor([shift], device=self.device), sink_keys.shape[-1], theta)  # (1, d/2)
        keys = sink_keys if dim == 2 else sink_keys.unsqueeze(1)                       # (B, heads, sinks, d)
        moved = apply_rope(keys, cos, sin, interleaved=interleaved)
        moved = moved if dim == 2 else moved.squeeze(1)
        self._rope_part(buffers[name].narrow(dim, 0, self.sinks)).copy_(moved)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = True,
        scale: float | None = None,
        fused: bool = False,
    ) -> torch.Tensor:
        """Attention under the window's mask (causal by construction: a query never sees a later token)."""
        expected = (1, k.shape[-2]) if self._mask is None else tuple(self._mask.shape[-2:])
        if (q.shape[-2], k.shape[-2]) != expected:
            raise RuntimeError(f"attend reads what the last update returned: got {q.shape[-2]} queries, {k.shape[-2]} keys")
        return scaled_dot_product_attention(q, k, v, mask=self._mask, scale=scale, fused=fused)


class SlidingWindowKVCache(SlidingWindowCache):
    """Keys and values for :class:`kqv.Attention` in a window: two buffers (B, H_kv, window, D).

    ``rope_theta``: the RoPE base of the keys (Llama's rotate-half pairs, as
    :class:`kqv.Attention`), to move the sinks; None for keys without RoPE.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        window: int,
        *,
        sinks: int = 0,
        sink_positions: str = "cache",
        rope_theta: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, num_kv_heads, None, head_dim)
        rope = None if rope_theta is None else ("k", 0, rope_theta, False)
        super().__init__(
            {"k": shape, "v": shape}, window=window, sinks=sinks, sink_positions=sink_positions,
            rope=rope, dtype=dtype, device=device,
        )

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T, D); return what the queries read, (B, H_kv, S, D), S <= window + T."""
        return self._roll({"k": k, "v": v})  # type: ignore[return-value]


class SlidingWindowLatentCache(SlidingWindowCache):
    """MLA's latent rows [c_kv ; k_rope] in a window: one buffer (B, window, d_c + d_r).

    ``rope_theta``: MLA's RoPE base (adjacent pairs, as
    :class:`kqv.MultiHeadLatentAttention`); only the last d_r numbers of a row are rotated.
    """

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        window: int,
        *,
        sinks: int = 0,
        sink_positions: str = "cache",
        rope_theta: float | None = 10000.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        rope = None if rope_theta is None else ("latent", kv_lora_rank, rope_theta, True)
        super().__init__(
            {"latent": (batch_size, None, kv_lora_rank + qk_rope_head_dim)}, window=window, sinks=sinks,
            sink_positions=sink_positions, rope=rope, dtype=dtype, device=device,
        )
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Store c_kv (B, T, d_c) and k_rope (B, T, d_r); return the rows the queries read, (B, S, d_c + d_r)."""
        if c_kv.shape[-1] != self.kv_lora_rank or k_rope.shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"expected widths d_c={self.kv_lora_rank} and d_r={self.qk_rope_head_dim}, "
                f"got c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)}"
            )
        (latent,) = self._roll({"latent": torch.cat((c_kv, k_rope), dim=-1)})
        return latent


def window_cache(
    module: torch.nn.Module,
    batch_size: int,
    window: int,
    *,
    sinks: int = 0,
    sink_positions: str = "cache",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """The window cache that an attention module or a whole decoder needs, with its RoPE base.

    ``module``: a :class:`kqv.Attention` (gives a :class:`SlidingWindowKVCache`),
    a :class:`kqv.MultiHeadLatentAttention` (a :class:`SlidingWindowLatentCache`),
    or a :class:`kqv.model.Decoder` (a :class:`~kqv.cache.ModelCache` of either).
    """
    from .attention import Attention
    from .mla import MultiHeadLatentAttention

    kw = dict(sinks=sinks, sink_positions=sink_positions)
    if hasattr(module, "layers"):
        return ModelCache(
            [window_cache(l.self_attn, batch_size, window, dtype=dtype, device=device, **kw) for l in module.layers]
        )
    if isinstance(module, MultiHeadLatentAttention):
        w = module.kv_b_proj.weight
        return SlidingWindowLatentCache(
            batch_size, module.kv_lora_rank, module.qk_rope_head_dim, window, rope_theta=module.rope_theta,
            dtype=dtype or w.dtype, device=device or w.device, **kw,
        )
    if isinstance(module, Attention):
        w = module.k_proj.weight
        return SlidingWindowKVCache(
            batch_size, module.num_kv_heads, module.head_dim, window, rope_theta=module.rope_theta,
            dtype=dtype or w.dtype, device=device or w.device, **kw,
        )
    raise TypeError(f"no window cache for a {type(module).__name__}")


# --- Measuring it: perplexity over a text longer than the window ---------------------------


@torch.no_grad()
def window_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    window: int,
    *,
    sinks: int = 0,
    sink_positions: str = "cache",
    chunk: int | None = None,
) -> float:
    """Perplexity of a text read through a window cache, every token predicted from what the cache holds.

    Args:
        model: a :class:`kqv.model.Decoder`.
        input_ids: token ids (1, T) or (T,); longer than ``window`` to mean anything.
        window, sinks, sink_positions: of every layer's cache (:class:`SlidingWindowCache`).
        chunk: tokens per forward pass once the window is full. None (the
            default) reads the first ``window`` tokens at once, then one token
            at a time: StreamingLLM's evaluation, exact and slow. A larger
            chunk is faster; with ``sink_positions="text"`` it changes nothing,
            with ``"cache"`` the later tokens of a chunk see the sinks a little
            further away (see :mod:`kqv.window`).
    """
    from .evaluate import one_text

    input_ids = one_text(model, input_ids)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    T = input_ids.shape[1]
    cache = window_cache(model, 1, window, sinks=sinks, sink_positions=sink_positions)
    logits, start = [], 0
    while start < T:
        n = min(window, T) if start == 0 else (chunk or 1)
        logits.append(model(input_ids[:, start : start + n], cache=cache))                 # (1, n, vocab)
        start += n
    nll = F.cross_entropy(torch.cat(logits, 1)[0, :-1].float(), input_ids[0, 1:])
    return math.exp(float(nll))


def window_sweep(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[int],
    sinks: Sequence[int] = (0, 4),
    *,
    sink_positions: str = "cache",
    chunk: int | None = None,
) -> list[dict]:
    """Perplexity for each window and number of sinks, and with the whole text in a dense cache.

    Returns one dict per (window, sinks) pair: ``window``, ``sinks``,
    ``perplexity``, ``bytes_per_token`` (the model's cache per slot, all
    layers) and ``cache_bytes`` (what one sequence's window holds); and a last
    row with ``window=None``, the full context.
    """
    from .evaluate import perplexity

    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    bytes_per_token = model.new_cache(1, 1).bytes_per_token
    rows = []
    for w in windows:
        for s in sinks:
            rows.append({
                "window": w, "sinks": s, "bytes_per_token": bytes_per_token, "cache_bytes": w * bytes_per_token,
                "perplexity": window_perplexity(model, ids, w, sinks=s, sink_positions=sink_positions, chunk=chunk),
            })
    T = ids.shape[-1]
    rows.append({
        "window": None, "sinks": 0, "bytes_per_token": bytes_per_token, "cache_bytes": T * bytes_per_token,
        "perplexity": perplexity(model, ids),
    })
    return rows
