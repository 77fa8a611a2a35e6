"""Caches that know their own size.

During generation every new token needs the keys and values of all the tokens
before it. Recomputing them each step costs O(S) projections per step; keeping
them costs memory. A cache here is a set of preallocated buffers with a fill
level, like gpt-fast's and torchtune's, plus what those lack: it reports
``bytes_per_token`` and ``nbytes``, which equal what its tensors occupy.

- :class:`KVCache` keeps per-KV-head keys and values, (B, H_kv, S_max, D) each:
  ``2 * H_kv * D`` numbers per token (MHA, GQA and MQA differ only in H_kv).
- :class:`LatentCache` keeps MLA's normalized latent c_kv (d_c numbers) and the
  one RoPE key shared by all heads (d_r numbers), side by side in a buffer of
  shape (B, S_max, d_c + d_r): ``d_c + d_r`` numbers per token, whatever the
  number of heads.
- :class:`ModelCache` is one cache per layer of a decoder.

Rows of different lengths. Each row of a cache is one sequence with its own
fill level. :meth:`Cache.select` picks the rows that the next forward pass
writes to and reads (all of them by default), and :meth:`Cache.reset` can
empty some rows for new sequences: a batch whose sequences have different
lengths, joining and leaving between steps, as a server's does. Rows that hold
different numbers of tokens get their own positions and a mask that hides
each row's unused slots. The slots a row never fills are still reserved: the
paged cache of :mod:`kqv.paged` is the one that stops reserving them.

What an attention module asks of a cache: ``update`` (:meth:`KVCache.update`,
:meth:`LatentCache.update`) stores the new tokens and returns what attention
reads, :meth:`Cache.attend` computes the attention of the new queries over it,
and :attr:`Cache.next_position` says where the next token sits. The caches of :mod:`kqv.paged`, :mod:`kqv.quant` and
:mod:`kqv.window` keep their tokens otherwise (in blocks, quantized, in a
rolling window) and answer the same three questions their own way.

Book: chapter 4 ("The KV cache") and chapter 8 ("Multi-head latent attention").
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

__all__ = ["Cache", "KVCache", "LatentCache", "ModelCache"]


class Cache:
    """Named buffers that grow along one sequence axis, filled from the left.

    Args:
        shapes: for each buffer, its shape with ``None`` where the sequence axis is.
        batch_size, max_len: B and S_max.
        dtype, device: of every buffer (float32 and the CPU by default).
        dtypes: buffers stored in another dtype than ``dtype`` (a quantized
            cache's int8 values and float32 scales), by name.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int | None, ...]],
        *,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"a cache holds floating-point numbers, got dtype {dtype}")
        self.max_len = max_len
        self._seq_dims: dict[str, int] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            seq_dim = shape.index(None)
            if seq_dim == 0:
                raise ValueError(f"{name}: axis 0 is the batch axis, the sequence axis comes after it; got {shape}")
            full = tuple(max_len if s is None else s for s in shape)
            self._seq_dims[name] = seq_dim
            self.buffers[name] = torch.zeros(full, dtype=(dtypes or {}).get(name, dtype), device=device)
        self.lengths = [0] * self.num_rows     # S of each row: how many tokens it holds
        self._rows: list[int] | None = None   # the selected rows; None: all of them
        self._key_lengths: torch.Tensor | None = None   # (b,) after an update whose rows differ, for attend

    # --- what it holds -------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.buffers.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    @property
    def num_rows(self) -> int:
        """Rows the cache has room for: one sequence each."""
        return next(iter(self.buffers.values())).shape[0]

    @property
    def rows(self) -> list[int]:
        """The rows the next forward pass writes to and reads, in its batch order (see :meth:`select`)."""
        return list(range(self.num_rows)) if self._rows is None else list(self._rows)

    @property
    def every_row(self) -> bool:
        """Are all rows selected, in order (so the batch is the buffers themselves)?"""
        return self._rows is None or self._rows == list(range(self.num_rows))

    @property
    def batch_size(self) -> int:
        """B of the next forward pass: the number of selected rows."""
        return self.num_rows if self._rows is None else len(self._rows)

    @property
    def length(self) -> int:
        """S: the tokens the selected rows hold (the longest of them, when they differ)."""
        return max(self.lengths[r] for r in self.rows)

    @length.setter
    def length(self, value: int) -> None:
        """Set every selected row's fill level (to forget tokens written after it)."""
        if not 0 <= value <= self.max_len:
            raise ValueError(f"length must be in 0..max_len={self.max_len}, got {value}")
        for r in self.rows:
            self.lengths[r] = value

    @property
    def bytes_per_token(self) -> int:
        """Bytes that one more token of one sequence occupies in this cache."""
        total = 0
        for name, buf in self.buffers.items():
            per_slot = buf.numel() // (buf.shape[self._seq_dims[name]] * buf.shape[0])
            total += per_slot * buf.element_size()
        return total

    @property
    def nbytes(self) -> int:
        """Bytes that the preallocated buffers occupy: B * S_max * bytes_per_token."""
        return sum(buf.element_size() * buf.numel() for buf in self.buffers.values())

    @property
    def next_position(self) -> int | torch.Tensor:
        """The position of the next token written: the number of tokens held.

        One int when the selected rows hold equally many, else a (B,) tensor of them.
        """
        held = [self.lengths[r] for r in self.rows]
        if len(set(held)) == 1:
            return held[0]
        return torch.tensor(held, device=self.device)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={tuple(b.shape)}" for n, b in self.buffers.items())
        return (
            f"{type(self).__name__}({parts}, length={self.length}, dtype={self.dtype}, "
            f"bytes_per_token={self.bytes_per_token})"
        )

    # --- choosing rows ---------------------------------------------------------
    def _check_rows(self, rows: Sequence[int]) -> list[int]:
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < self.num_rows]
        if bad or not rows or len(set(rows)) != len(rows):
            raise ValueError(
                f"rows must be distinct, at least one, each in 0..{self.num_rows - 1} "
                f"(the cache has {self.num_rows} rows); got {rows}"
            )
        return rows

    def select(self, rows: Sequence[int] | None = None) -> None:
        """Make the next forward passes write to and read ``rows`` only, in that order (None: every row).

        The batch a module is then given has ``len(rows)`` sequences: row
        ``rows[i]`` takes batch element i. With one row selected, a sequence
        is prefilled alone; with all of them, the batch decodes together.
        """
        self._rows = None if rows is None else self._check_rows(rows)
        self._key_lengths = None

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget every token of ``rows`` (default: of every row); the buffers stay allocated.

        An emptied row takes a new sequence: that is how one leaves and another joins.
        """
        for r in range(self.num_rows) if rows is None else self._check_rows(rows):
            self.lengths[r] = 0
        self._key_lengths = None

    # --- filling it ----------------------------------------------------------
    def _check_new(self, new: dict[str, torch.Tensor]) -> int:
        """Check the new tokens' tensors against the buffers (B = the selected rows); return T."""
        if set(new) != set(self.buffers):
            raise ValueError(f"expected tensors for {sorted(self.buffers)}, got {sorted(new)}")
        lengths = {name: t.shape[self._seq_dims[name]] for name, t in new.items() if t.dim()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"new tensors disagree on the number of tokens: {lengths}")
        T = next(iter(lengths.values()))
        for name, t in new.items():
            buf, dim = self.buffers[name], self._seq_dims[name]
            expected = list(buf.shape)
            expected[0], expected[dim] = self.batch_size, T
            if list(t.shape) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, the cache expects {tuple(expected)}"
                )
            if t.dtype != buf.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}, the cache holds {buf.dtype}")
        return T

    def append(self, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write T new tokens after the S held ones of each selected row and return all S + T.

        Every buffer must be given, each with T on its sequence axis and the
        selected rows on its batch axis. With every row selected the results
        are views of the buffers; with some, copies of those rows. When the
        rows hold different numbers of tokens, each is returned up to the
        longest, and :meth:`attend` masks the slots a row has not filled.
        """
        T = self._check_new(new)
        rows = self.rows
        starts = [self.lengths[r] for r in rows]
        full = [(r, s) for r, s in zip(rows, starts) if s + T > self.max_len]
        if full:
            r, s = full[0]
            raise RuntimeError(
                f"cache overflow: row {r} holds {s} of max_len={self.max_len} tokens "
                f"and cannot take {T} more; create it with a larger max_len"
            )
        for name, t in new.items():
            buf, dim = self.buffers[name], self._seq_dims[name]
            if self.every_row and len(set(starts)) == 1:
                buf.narrow(dim, starts[0], T).copy_(t)          # one fill level: one slice
            else:
                for i, (r, start) in enumerate(zip(rows, starts)):
                    buf[r].narrow(dim - 1, start, T).copy_(t[i])
        ends = [s + T for s in starts]
        for r, end in zip(rows, ends):
            self.lengths[r] = end
        self._key_lengths = None if len(set(ends)) == 1 else torch.tensor(ends, device=self.device)
        index = None if self.every_row else torch.tensor(rows, device=self.device)
        views = []
        for name in new:
            buf = self.buffers[name] if index is None else self.buffers[name].index_select(0, index)
            views.append(buf.narrow(self._seq_dims[name], 0, max(ends)))
        return tuple(views)

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
        """Attention of the new queries over what ``update`` returned.

        Here every row holds its tokens in order, the new ones last, so this is
        :func:`kqv.attention.scaled_dot_product_attention` with its bottom-right
        causal mask. Rows of different lengths each end at their own length:
        key j is seen by row r's query i when j <= L_r - T + i (j < L_r without
        the causal mask). Caches that hold tokens otherwise (in blocks, in a
        rolling window) know which key each query may see, and override this.
        """
        from .attention import scaled_dot_product_attention  # attention.py imports this module

        if self._key_lengths is None:
            return scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, fused=fused)
        T, S = q.shape[-2], k.shape[-2]
        L = self._key_lengths.view(-1, 1, 1, 1)                                 # (B, 1, 1, 1)
        key = torch.arange(S, device=q.device)                                  # (S,)
        if is_causal:
            query = L - T + torch.arange(T, device=q.device).view(-1, 1)        # (B, 1, T, 1): its position
            mask = key <= query                                                 # (B, 1, T, S)
        else:
            mask = key < L                                                      # (B, 1, 1, S)
        return scaled_dot_product_attention(q, k, v, mask=mask, scale=scale, fused=fused)


class KVCache(Cache):
    """Keys and values for :class:`kqv.Attention`: two buffers of shape (B, H_kv, S_max, D)."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, num_kv_heads, None, head_dim)
        super().__init__({"k": shape, "v": shape}, max_len=max_len, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape (B, H_kv, T, D); return all keys and values, (B, H_kv, S+T, D)."""
        return self.append(k=k, v=v)  # type: ignore[return-value]


class LatentCache(Cache):
    """MLA's cache: per token, the normalized latent c_kv (d_c) and the RoPE key (d_r).

    Both sit side by side in one buffer, (B, S_max, d_c + d_r), because the
    absorbed path attends against exactly that row: one "KV head" of width
    d_c + d_r shared by every query head, the layout of FlashMLA's decode kernel.
    """

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            {"latent": (batch_size, None, kv_lora_rank + qk_rope_head_dim)},
            max_len=max_len,
            dtype=dtype,
            device=device,
        )
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Append c_kv (B, T, d_c) and k_rope (B, T, d_r); return every row, (B, S, d_c + d_r)."""
        if c_kv.shape[-1] != self.kv_lora_rank or k_rope.shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"expected widths d_c={self.kv_lora_rank} and d_r={self.qk_rope_head_dim}, "
                f"got c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)}"
            )
        if c_kv.shape[:-1] != k_rope.shape[:-1]:
            raise ValueError(f"c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)} disagree before the last axis")
        (latent,) = self.append(latent=torch.cat((c_kv, k_rope), dim=-1))  # (B, S, d_c + d_r)
        return latent


class ModelCache(Sequence[Cache]):
    """One cache per layer of a decoder, with the totals of all of them."""

    def __init__(self, layers: Sequence[Cache]) -> None:
        if not layers:
            raise ValueError("a model cache needs at least one layer")
        self.layers = list(layers)

    def __getitem__(self, i):  # type: ignore[override]
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Cache]:
        return iter(self.layers)

    @property
    def length(self) -> int:
        """Tokens held (the same in every layer; the longest selected row's, when rows differ)."""
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def select(self, rows: Sequence[int] | None = None) -> None:
        """Select the same rows in every layer (see :meth:`Cache.select`)."""
        for c in self.layers:
            c.select(rows)

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    @property
    def next_position(self):
        """The position of the next token (the same in every layer; per sequence for a paged cache)."""
        return self.layers[0].next_position

    def begin(self, batch_size: int, num_tokens: int) -> None:
        """Called by :class:`kqv.model.Decoder` before its layers run on ``num_tokens`` new tokens.

        Caches of one layer each need nothing; a :class:`kqv.paged.PagedModelCache`,
        whose layers share one set of block tables, reserves the new tokens' slots here.
        """

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more token of one sequence occupies, over all layers."""
        return sum(c.bytes_per_token for c in self.layers)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty ``rows`` (default: all) in every layer."""
        for c in self.layers:
            c.reset(rows)

    def __repr__(self) -> str:
        return (
            f"ModelCache({len(self.layers)} x {type(self.layers[0]).__name__}, "
            f"length={self.length}, bytes_per_token={self.bytes_per_token}, nbytes={self.nbytes})"
        )
