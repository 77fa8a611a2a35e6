"""A paged KV cache: fixed-size blocks, a pool, a free list and a block table per sequence.

The caches of :mod:`kqv.cache` give each sequence of a batch a contiguous row
of S_max slots. A row can hold a sequence of any length and take a new one
when it finishes (:meth:`kqv.cache.Cache.select`), but it keeps its S_max
slots whatever it holds. A server cannot work that way: its requests have
different lengths, arrive and finish at different times, and most never reach
S_max. Reserving S_max for each wastes most of the memory that should hold
other requests' tokens (:func:`memory_waste` counts it).

PagedAttention (Kwon et al. 2023, vLLM, arXiv 2309.06180) borrows the answer
of an operating system's virtual memory::

    pool of blocks (one tensor per layer)       block tables (one per sequence)
    +----+----+----+----+----+----+----+
    | b0 | b1 | b2 | b3 | b4 | b5 | .. |        seq 0: [b0, b3, b4]   (40 tokens)
    +----+----+----+----+----+----+----+        seq 1: [b1]           (9 tokens)
       each block holds block_size tokens        seq 2: [b0, b3, b2]   (shares b0, b3 with seq 0)

- The pool is carved into blocks of ``block_size`` tokens (16 by default, as
  vLLM's ``CacheConfig.DEFAULT_BLOCK_SIZE``). A sequence's tokens live in
  whatever blocks are free when it needs them; its **block table** lists them
  in order, so token t sits in block ``table[t // block_size]`` at offset
  ``t % block_size``. A sequence wastes at most one partly filled block.
- A **free list** hands out blocks and takes them back when a sequence
  finishes, so sequences can join and leave the batch between any two steps
  (continuous batching).
- Blocks are **reference-counted**: :meth:`BlockManager.fork` makes a new
  sequence that shares every block of another, such as a common system prompt,
  stored once. Full blocks are never written again, so sharing them is free; a
  shared block that one sequence must write to is first copied for it
  (**copy-on-write**).

The bookkeeping (:class:`BlockManager`) is one object for the whole model; each
layer keeps only its pool (:class:`PagedKVCache`, :class:`PagedLatentCache`),
indexed by the same block tables, as in vLLM.

Reading the cache is where paging costs something: a sequence's keys are no
longer one slice of memory. :func:`paged_attention` has two ways to read them:

- gather (``blockwise=False``): copy each sequence's blocks into a padded
  (B, H_kv, S, D) tensor and attend as usual, with a mask: the readable path,
  but it copies the whole cache at every step;
- blockwise (``blockwise=True``, the default): attend to every block where it
  lies in the pool, then merge the blocks of each sequence with one softmax.
  This is flash-decoding with the blocks as its splits, and what vLLM's paged
  attention kernels do: no key is copied.

Book: the "Serving the cache" chapter (Part IV).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import scaled_dot_product_attention
from .cache import ModelCache

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "memory_waste",
    "mixed_lengths",
    "BlockManager",
    "BlockLayout",
    "paged_attention",
    "PagedCache",
    "PagedKVCache",
    "PagedLatentCache",
    "PagedModelCache",
    "paged_cache",
    "continuous_batching",
]

#: vLLM's default number of tokens per block (``CacheConfig.DEFAULT_BLOCK_SIZE``
#: in vllm/config/cache.py; its CPU backend uses 128 where Intel's extension
#: provides its kernels, vllm/platforms/cpu.py).
DEFAULT_BLOCK_SIZE = 16


# --- 1. What contiguous allocation wastes ------------------------------------------


def memory_waste(lengths: Sequence[int], max_len: int, block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, float]:
    """Token slots reserved for a batch of sequences: contiguous S_max buffers against blocks.

    Args:
        lengths: how many tokens each sequence holds (its prompt and what it generated).
        max_len: S_max, what a contiguous cache reserves for every sequence.
        block_size: tokens per block of a paged cache.

    Returns:
        ``used`` (tokens held), ``contiguous`` and ``paged`` (slots each
        reserves), ``contiguous_waste`` and ``paged_waste`` (reserved but
        unused slots), and the same two as fractions of what is reserved
        (``contiguous_waste_fraction``, ``paged_waste_fraction``). Multiply by
        a cache's ``bytes_per_token`` for bytes.
    """
    if max_len < 1 or block_size < 1:
        raise ValueError(f"max_len ({max_len}) and block_size ({block_size}) must be positive")
    bad = [n for n in lengths if not 0 <= n <= max_len]
    if bad:
        raise ValueError(f"every length must lie in 0..max_len={max_len}, got {bad[:4]}")
    used = sum(lengths)
    contiguous = len(lengths) * max_len
    paged = sum(math.ceil(n / block_size) * block_size for n in lengths)  # the last block of each is partly empty
    return {
        "used": used,
        "contiguous": contiguous,
        "paged": paged,
        "contiguous_waste": contiguous - used,
        "paged_waste": paged - used,
        "contiguous_waste_fraction": (contiguous - used) / contiguous if contiguous else 0.0,
        "paged_waste_fraction": (paged - used) / paged if paged else 0.0,
    }


def mixed_lengths(n: int, low: int, high: int, *, seed: int = 0) -> list[int]:
    """``n`` sequence lengths between ``low`` and ``high``, log-uniform: many short, a few long.

    Requests to a server are mostly short with a long tail; a log-uniform draw
    is a simple stand-in for such a mix (fixed by ``seed``).
    """
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return [int(round(math.exp(math.log(low) + x * (math.log(high) - math.log(low))))) for x in u.tolist()]


# --- 2. The bookkeeping: pool, free list, block tables -------------------------------


@dataclass
class _Step:
    """The tokens that one forward pass adds: ``num_tokens`` to each sequence of ``seq_ids``."""

    seq_ids: list[int]
    num_tokens: int
    starts: list[int]                              # each sequence's length before the step
    tables: list[list[int]]                        # each sequence's block table, covering the new tokens
    written: set[int] = field(default_factory=set)  # ids of the caches that have written their part
    committed: bool = False
    layouts: dict = field(default_factory=dict)     # device -> BlockLayout
    _slots: dict = field(default_factory=dict)      # device -> (block, offset)

    def slots(self, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The block and the offset in it of every new token, (B*T,) each, sequence by sequence."""
        if device not in self._slots:
            positions = [range(s, s + self.num_tokens) for s in self.starts]
            block = [table[p // block_size] for table, ps in zip(self.tables, positions) for p in ps]
            offset = [p % block_size for ps in positions for p in ps]
            self._slots[device] = (torch.tensor(block, device=device), torch.tensor(offset, device=device))
        return self._slots[device]


class BlockManager:
    """The pool's bookkeeping, shared by every layer: free list, reference counts, block tables.

    A serving loop uses it in four moves (add, select, fork, free)::

        blocks = BlockManager(num_blocks=256)                # blocks of 16 tokens
        cache = paged_cache(model, blocks)                   # a pool per layer, one set of tables
        a = blocks.add()                                     # a new, empty sequence
        blocks.select([a]); model(prompt_a, cache=cache)     # prefill it alone: (1, T_a)
        b = blocks.fork(a)                                   # b shares a's blocks (a common prefix)
        blocks.select([a, b]); model(next_ab, cache=cache)   # one decode step for both: (2, 1)
        blocks.free(a)                                       # a has finished: its blocks go back

    Each forward pass is one **step**: :meth:`begin` (which a
    :class:`PagedModelCache` calls for the model) reserves room for the new
    tokens of every selected sequence, allocating blocks and copying shared
    ones that will be written, before any layer writes; each layer's cache then
    writes its part, and once every cache on this manager has written, the
    sequences' lengths grow. A step that fails half-way changes no length:
    what was cached stays as it was.

    Args:
        num_blocks: blocks in the pool (of every layer).
        block_size: tokens per block (16 by default, as in vLLM).
    """

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest id first: the blocks in use stay packed at the start of the pool,
        # which is the part of it that the blockwise kernel reads.
        self._free = list(range(num_blocks))
        self.refcount = [0] * num_blocks
        self.tables: dict[int, list[int]] = {}   # live sequences: id -> block table
        self.lengths: dict[int, int] = {}        # live sequences: id -> tokens held
        self._finished: set[int] = set()
        self._next_id = 0
        self.batch: list[int] = []               # the sequences of the next step, in batch order
        self._caches: list[PagedCache] = []      # every layer's pool, for copy-on-write
        self.step: _Step | None = None

    # --- what it holds ---------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        """Blocks holding some sequence's tokens (a shared block counts once)."""
        return self.num_blocks - len(self._free)

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"in_use={self.blocks_in_use}, sequences={dict(self.lengths)})"
        )

    # --- sequences joining, sharing and leaving ----------------------------------------
    def add(self) -> int:
        """A new, empty sequence; returns its id."""
        self._settle_step("add a sequence")
        seq = self._next_id
        self._next_id += 1
        self.tables[seq], self.lengths[seq] = [], 0
        return seq

    def fork(self, parent: int) -> int:
        """A new sequence holding the same tokens as ``parent``, sharing its blocks (no copy)."""
        self._settle_step("fork a sequence")
        self._check_live([parent])
        child = self.add()
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]
        for block in self.tables[child]:
            self.refcount[block] += 1
        return child

    def free(self, seq: int) -> None:
        """``seq`` has finished: drop its references; blocks nobody references return to the pool."""
        self._settle_step("free a sequence")
        self._check_live([seq])
        for block in self.tables.pop(seq):
            self._release(block)
        del self.lengths[seq]
        self._finished.add(seq)
        self.batch = [s for s in self.batch if s != seq]

    def reset(self) -> None:
        """Forget every sequence; the whole pool is free again (the caches keep their tensors)."""
        for seq in list(self.tables):
            for block in self.tables.pop(seq):
                self._release(block)
            del self.lengths[seq]
            self._finished.add(seq)
        self.batch, self.step = [], None

    def select(self, seq_ids: Sequence[int]) -> None:
        """The sequences of the next forward pass, in the order of the batch's rows."""
        self._settle_step("select another batch")
        seq_ids = list(seq_ids)
        self._check_live(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in the batch {seq_ids}")
        self.batch = seq_ids

    # --- one step: reserve, then every layer writes ---------------------------------------
    def begin(self, num_tokens: int) -> None:
        """Reserve room for ``num_tokens`` new tokens in every selected sequence.

        Takes a free block for each block the new tokens start, and copies each
        shared block they write into (copy-on-write). Checks everything first:
        if the pool is too small, nothing changes.
        """
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        if not self.batch:
            raise RuntimeError("no sequence is selected: call select([...]) with the batch's sequence ids first")
        self._settle_step("begin another step")
        self._check_live(self.batch)
        bs = self.block_size
        # Count the blocks this step needs before touching anything.
        refs = list(self.refcount)
        needed = 0
        for seq in self.batch:
            table, start = self.tables[seq], self.lengths[seq]
            for j in range(start // bs, (start + num_tokens - 1) // bs + 1):
                if j >= len(table):
                    needed += 1                                # a new block
                elif refs[table[j]] > 1:
                    needed += 1                                # a private copy of a shared block
                    refs[table[j]] -= 1
        if needed > len(self._free):
            raise RuntimeError(
                f"out of blocks: this step needs {needed} more blocks of {bs} tokens but only "
                f"{len(self._free)} of {self.num_blocks} are free; free finished sequences, or "
                f"create the BlockManager with more blocks"
            )
        for seq in self.batch:
            table, start = self.tables[seq], self.lengths[seq]
            for j in range(start // bs, (start + num_tokens - 1) // bs + 1):
                if j >= len(table):
                    table.append(self._take())
                elif self.refcount[table[j]] > 1:              # copy-on-write
                    shared, private = table[j], self._take()
                    for cache in self._caches:
                        cache.copy_block(shared, private)
                    self._release(shared)
                    table[j] = private
        # The lengths grow only when every layer has written (see _written).
        self.step = _Step(
            seq_ids=list(self.batch), num_tokens=num_tokens,
            starts=[self.lengths[s] for s in self.batch], tables=[list(self.tables[s]) for s in self.batch],
        )

    def cancel(self) -> None:
        """Drop a step that some layer could not finish: no length changes, nothing cached is lost."""
        self.step = None

    def layout(self, device: torch.device | str | None = None) -> "BlockLayout":
        """Where the keys of the current step's sequences are: its :class:`BlockLayout`, on ``device``."""
        if self.step is None:
            raise RuntimeError("no step has begun: call select([...]) then begin(num_tokens)")
        device = torch.device(device or "cpu")
        step = self.step
        if device not in step.layouts:
            step.layouts[device] = BlockLayout.build(
                step.tables, [s + step.num_tokens for s in step.starts], step.num_tokens,
                self.block_size, self.num_blocks, device=device,
            )
        return step.layouts[device]

    # --- used by the caches ------------------------------------------------------------
    def _attach(self, cache: "PagedCache") -> None:
        self._settle_step("attach a cache")
        self._caches.append(cache)

    def _open_step(self, cache: "PagedCache", batch_size: int, num_tokens: int) -> _Step:
        """The step that ``cache`` is about to write, checked against what it was given."""
        step = self.step
        if step is None or step.committed or id(cache) in step.written:
            raise RuntimeError(
                "no step is waiting for this cache: call blocks.select([...]) and blocks.begin(num_tokens) "
                "before each forward pass (a PagedModelCache does the second for you)"
            )
        if (batch_size, num_tokens) != (len(step.seq_ids), step.num_tokens):
            raise ValueError(
                f"the step was begun for {len(step.seq_ids)} sequences of {step.num_tokens} new tokens, "
                f"the cache was given {batch_size} of {num_tokens}"
            )
        return step

    def _written(self, cache: "PagedCache") -> None:
        """``cache`` has written the step's tokens; once every cache has, the lengths grow."""
        step = self.step
        step.written.add(id(cache))
        if len(step.written) == len(self._caches):
            for seq, start in zip(step.seq_ids, step.starts):
                self.lengths[seq] = start + step.num_tokens
            step.committed = True

    def _take(self) -> int:
        block = heapq.heappop(self._free)
        self.refcount[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            heapq.heappush(self._free, block)

    def _check_live(self, seq_ids: Sequence[int]) -> None:
        for seq in seq_ids:
            if seq in self._finished:
                raise KeyError(f"sequence {seq} has finished (it was freed); its blocks may hold other tokens now")
            if seq not in self.tables:
                raise KeyError(f"sequence {seq} is unknown: the live sequences are {sorted(self.tables)}")

    def _settle_step(self, what: str) -> None:
        """Before changing the batch: a step that no cache has written yet is dropped; a half-written one is an error."""
        step = self.step
        if step is None or step.committed:
            return
        if step.written:
            raise RuntimeError(
                f"cannot {what}: {len(step.written)} of the {len(self._caches)} caches on this BlockManager "
                f"have written the current step; run the rest of the forward pass, or call cancel()"
            )
        self.step = None


# --- 3. Reading the blocks: paged attention ----------------------------------------------


@dataclass
class BlockLayout:
    """Where a batch's keys are in the pool, for one step, built once and read by every layer.

    For the gather path: ``tables`` (B, M) block ids, -1 past the last block
    that holds each sequence's keys, and ``lengths`` (B,) keys per sequence, the ``num_new`` new
    tokens included (they are each sequence's last). For the blockwise path,
    the same as a list of blocks, each read by one row of the batch:
    ``readers`` (high,) for the blocks 0 .. high - 1 of the pool where they lie
    (-1: no sequence of the batch reads it), and ``extra_blocks``,
    ``extra_readers`` (E,) for second and later readers of a shared block.
    ``first_pos`` and ``extra_first_pos`` are the position of each block's
    first token in the sequence that reads it.
    """

    tables: torch.Tensor
    lengths: torch.Tensor
    num_new: int
    block_size: int
    readers: torch.Tensor
    first_pos: torch.Tensor
    extra_blocks: torch.Tensor
    extra_readers: torch.Tensor
    extra_first_pos: torch.Tensor

    @property
    def high(self) -> int:
        """1 + the largest block id the batch reads: the blockwise path reads the pool's blocks below it."""
        return self.readers.shape[0]

    @classmethod
    def build(
        cls,
        tables: Sequence[Sequence[int]],
        lengths: Sequence[int],
        num_new: int,
        block_size: int,
        num_blocks: int,
        *,
        device: torch.device | str | None = None,
    ) -> "BlockLayout":
        """Check block tables against the pool and lay them out for :func:`paged_attention`.

        Args:
            tables: one list of block ids per sequence, in order.
            lengths: keys per sequence, the new ones included.
            num_new: T, the new tokens at the end of every sequence (the queries).
            block_size, num_blocks: of the pool.
        """
        if len(tables) != len(lengths):
            raise ValueError(f"{len(tables)} block tables but {len(lengths)} lengths")
        for row, (table, n) in enumerate(zip(tables, lengths)):
            outside = [b for b in table if not 0 <= b < num_blocks]
            if outside:
                raise IndexError(
                    f"the block table of row {row} points to block {outside[0]}, outside the pool of "
                    f"{num_blocks} blocks (0..{num_blocks - 1})"
                )
            if not num_new <= n <= len(table) * block_size:
                raise ValueError(
                    f"row {row} holds {n} keys, but needs at least the {num_new} new ones and at most "
                    f"the {len(table) * block_size} slots of its {len(table)} blocks of {block_size}"
                )
        # Each row's blocks that hold its keys (a table may reach further: blocks reserved ahead).
        used = [math.ceil(n / block_size) for n in lengths]
        B, M = len(tables), max(used)
        padded = torch.full((B, M), -1, dtype=torch.long)
        for row, table in enumerate(tables):
            padded[row, : used[row]] = torch.tensor(table[: used[row]], dtype=torch.long)
        # Every (block, reader) pair, in order.
        used = torch.tensor(used)                                                     # (B,)
        j = torch.arange(M).expand(B, M)
        pair_rows = torch.arange(B).unsqueeze(1).expand(B, M)[j < used.unsqueeze(1)]   # (P,)
        pair_j = j[j < used.unsqueeze(1)]                                             # (P,)
        pair_blocks = padded[pair_rows, pair_j]                                       # (P,)
        # Each block is read where it lies by its first pair; a shared block's other pairs are extra.
        high = int(pair_blocks.max()) + 1
        P = pair_blocks.shape[0]
        first = torch.full((high,), P).scatter_reduce_(0, pair_blocks, torch.arange(P), "amin")  # (high,)
        read = first < P
        readers = torch.full((high,), -1, dtype=torch.long)
        first_pos = torch.zeros(high, dtype=torch.long)
        readers[read] = pair_rows[first[read]]
        first_pos[read] = pair_j[first[read]] * block_size
        is_extra = first[pair_blocks] != torch.arange(P)
        extra = torch.stack((pair_blocks, pair_rows, pair_j * block_size), 1)[is_extra]          # (E, 3)
        return cls(
            tables=padded.to(device), lengths=torch.tensor(list(lengths), dtype=torch.long, device=device),
            num_new=num_new, block_size=block_size,
            readers=readers.to(device), first_pos=first_pos.to(device),
            extra_blocks=extra[:, 0].to(device), extra_readers=extra[:, 1].to(device),
            extra_first_pos=extra[:, 2].to(device),
        )


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    layout: BlockLayout,
    *,
    is_causal: bool = True,
    scale: float | None = None,
    blockwise: bool = True,
) -> torch.Tensor:
    """Attention of each sequence's new queries over its keys, read through its block table.

    Args:
        q: queries (B, H, T, D): the last T tokens of each sequence.
        k_pool, v_pool: the pools (num_blocks, H_kv, block_size, D) and
            (num_blocks, H_kv, block_size, D_v), H divisible by H_kv.
        layout: where each sequence's keys are (:class:`BlockLayout`).
        is_causal: each query sees the keys up to its own position (else all its sequence's keys).
        scale: of the scores; default 1 / sqrt(D).
        blockwise: attend to the blocks where they lie and merge (True), or
            gather each sequence's blocks into a padded tensor first (False).

    Returns:
        (B, H, T, D_v) in the dtype of q.
    """
    B, H, T, D = q.shape
    if (B, T) != (layout.lengths.shape[0], layout.num_new):
        raise ValueError(
            f"q holds {B} sequences of {T} queries, the layout {layout.lengths.shape[0]} of {layout.num_new}"
        )
    if k_pool.shape[2] != layout.block_size or k_pool.shape[0] < layout.high:
        raise ValueError(
            f"the pool {tuple(k_pool.shape)} does not fit the layout: blocks of {layout.block_size} tokens, "
            f"ids up to {layout.high - 1}"
        )
    H_kv = k_pool.shape[1]
    if H % H_kv:
        raise ValueError(f"the number of query heads H ({H}) must be divisible by the number of KV heads H_kv ({H_kv})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Absolute positions of the queries: the last T tokens of each sequence.
    q_pos = layout.lengths.unsqueeze(1) - T + torch.arange(T, device=q.device)       # (B, T)
    if blockwise:
        return _attend_blockwise(q, k_pool, v_pool, layout, q_pos, is_causal, scale)
    return _attend_gathered(q, k_pool, v_pool, layout, q_pos, is_causal, scale)


def _visible(k_pos: torch.Tensor, rows: torch.Tensor, q_pos: torch.Tensor, lengths: torch.Tensor, is_causal: bool):
    """Which keys each query may see: (n, T, S) from key positions (n, S) of the sequences ``rows`` (n,)."""
    if is_causal:
        return k_pos.unsqueeze(1) <= q_pos[rows].unsqueeze(2)                         # (n, T, S)
    return (k_pos < lengths[rows].unsqueeze(1)).unsqueeze(1).expand(-1, q_pos.shape[1], -1)


def _attend_gathered(q, k_pool, v_pool, layout, q_pos, is_causal, scale) -> torch.Tensor:
    """Copy each sequence's blocks, in order, into one padded tensor; attend with a mask."""
    B, M = layout.tables.shape
    table = layout.tables.clamp(min=0)                                  # padding reads block 0, masked below
    k = k_pool[table].transpose(1, 2).flatten(2, 3)                     # (B, M, H_kv, bs, D) -> (B, H_kv, M*bs, D)
    v = v_pool[table].transpose(1, 2).flatten(2, 3)                     # (B, H_kv, M*bs, D_v)
    k_pos = torch.arange(M * layout.block_size, device=q.device).expand(B, -1)       # (B, S)
    rows = torch.arange(B, device=q.device)
    mask = _visible(k_pos, rows, q_pos, layout.lengths, is_causal).unsqueeze(1)      # (B, 1, T, S)
    return scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)


def _attend_blockwise(q, k_pool, v_pool, layout, q_pos, is_causal, scale) -> torch.Tensor:
    """Score every block where it lies in the pool, then one softmax per sequence across its blocks.

    Each block n is read by one row of the batch (``readers[n]``); its scores
    are that row's queries against the block's keys. The softmax of a row runs
    over all the blocks it reads: subtract the row's largest score, sum the
    exponentials over its blocks (``index_add_``), and add up each block's
    exponentials times its values. The keys never move: only the queries are
    gathered, one copy per block, and they are T tokens against the block's
    block_size.
    """
    B, H, T, D = q.shape
    H_kv, bs = k_pool.shape[1], layout.block_size
    q_per_kv = H // H_kv
    qg = q.reshape(B, H_kv, q_per_kv * T, D)                            # a group's query heads stacked, as in GQA
    exact = torch.promote_types(q.dtype, torch.float32)                 # half precision up to float32; float64 stays
    # The pool's blocks below `high` in place, then the second readers of shared blocks (copies).
    parts = [(k_pool[: layout.high], v_pool[: layout.high], layout.readers, layout.first_pos)]
    if layout.extra_blocks.numel():
        parts.append((k_pool[layout.extra_blocks], v_pool[layout.extra_blocks], layout.extra_readers, layout.extra_first_pos))
    offsets = torch.arange(bs, device=q.device)
    scores, rows_of = [], []
    for k, _, readers, first in parts:
        rows = readers.clamp(min=0)                                     # blocks nobody reads: row 0, all masked
        s = (qg[rows] @ k.transpose(-2, -1)).to(exact) * scale           # (n, H_kv, q_per_kv*T, bs)
        visible = _visible(first.unsqueeze(1) + offsets, rows, q_pos, layout.lengths, is_causal)  # (n, T, bs)
        visible = visible & (readers >= 0).view(-1, 1, 1)
        s = s.view(-1, H_kv, q_per_kv, T, bs).masked_fill(~visible[:, None, None], float("-inf"))
        scores.append(s)                                                # (n, H_kv, q_per_kv, T, bs)
        rows_of.append(rows)
    # Each row's largest score over all its blocks: the softmax's shift.
    top = torch.full((B, H_kv, q_per_kv, T), float("-inf"), device=q.device, dtype=exact)
    for s, rows in zip(scores, rows_of):
        block_max = s.amax(-1)                                          # (n, H_kv, q_per_kv, T)
        top.scatter_reduce_(0, rows.view(-1, 1, 1, 1).expand_as(block_max), block_max, "amax")
    total = torch.zeros(B, H_kv, q_per_kv, T, device=q.device, dtype=exact)
    out = torch.zeros(B, H_kv, q_per_kv, T, v_pool.shape[-1], device=q.device, dtype=exact)
    for s, rows, (_, v, _, _) in zip(scores, rows_of, parts):
        p = torch.exp(s - top[rows].unsqueeze(-1))                     # (n, H_kv, q_per_kv, T, bs); masked: 0
        total.index_add_(0, rows, p.sum(-1))
        pv = p.flatten(2, 3).to(v.dtype) @ v                            # (n, H_kv, q_per_kv*T, D_v)
        out.index_add_(0, rows, pv.view(-1, H_kv, q_per_kv, T, pv.shape[-1]).to(exact))
    out = out / total.unsqueeze(-1)                                     # (B, H_kv, q_per_kv, T, D_v)
    return out.reshape(B, H, T, -1).to(q.dtype)                         # (B, H, T, D_v)


# --- 4. One layer's pool -----------------------------------------------------------


class PagedCache:
    """One layer's pool of blocks, written and read through a shared :class:`BlockManager`.

    It answers what an attention module asks of any cache (see
    :mod:`kqv.cache`): ``update`` writes the new tokens into the slots the
    manager reserved and returns the pool (its blocks below the highest one in
    use), :meth:`attend` reads it through the block tables, and
    :attr:`next_position` gives each sequence of the batch its own position.

    Args:
        blocks: the bookkeeping, shared with the model's other layers.
        shapes: each pool's shape per block, with ``None`` where the block's tokens go.
        dtype, device: of the pools.
    """

    def __init__(
        self,
        blocks: BlockManager,
        shapes: dict[str, tuple[int | None, ...]],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"a paged cache holds floating-point numbers, got dtype {dtype}")
        self.blocks = blocks
        self.pools: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            full = (blocks.num_blocks, *(blocks.block_size if s is None else s for s in shape))
            self.pools[name] = torch.zeros(full, dtype=dtype, device=device)
        blocks._attach(self)

    # --- what it holds ---------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.pools.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.pools.values())).device

    @property
    def batch_size(self) -> int:
        """B: the sequences selected for the next step."""
        return len(self.blocks.batch)

    @property
    def next_position(self) -> torch.Tensor:
        """The position of each selected sequence's next token, (B,): its length."""
        return torch.tensor([self.blocks.lengths[s] for s in self.blocks.batch], dtype=torch.long, device=self.device)

    @property
    def length(self) -> int:
        """Tokens held by all live sequences together (a shared token counts once per sequence)."""
        return sum(self.blocks.lengths.values())

    @property
    def max_len(self) -> int:
        """Token slots in the pool."""
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies in this layer."""
        return sum(p[0].numel() * p.element_size() for p in self.pools.values()) // self.blocks.block_size

    @property
    def nbytes(self) -> int:
        """Bytes that the pools occupy: num_blocks * block_size * bytes_per_token."""
        return sum(p.numel() * p.element_size() for p in self.pools.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.pools.items())
        return f"{type(self).__name__}({parts}, dtype={self.dtype}, bytes_per_token={self.bytes_per_token})"

    def reset(self) -> None:
        """Forget every sequence (of every layer: the block tables are shared)."""
        self.blocks.reset()

    # --- writing and reading ------------------------------------------------------------
    def _write(self, new: dict[str, torch.Tensor], seq_dims: dict[str, int]) -> tuple[torch.Tensor, ...]:
        """Write each (B, ..., T, ...) tensor into its slots; return the pools below the highest block read."""
        first = next(iter(new))
        B, T = new[first].shape[0], new[first].shape[seq_dims[first]]
        for name, t in new.items():
            pool = self.pools[name]
            expected = (B, *pool.shape[1:])
            expected = expected[: seq_dims[name]] + (T,) + expected[seq_dims[name] + 1 :]
            if tuple(t.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, the cache expects {expected}")
            if t.dtype != pool.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}, the cache holds {pool.dtype}")
        step = self.blocks._open_step(self, B, T)
        block, offset = step.slots(self.blocks.block_size, self.device)  # (B*T,) each: where each new token goes
        for name, t in new.items():
            rows = t.movedim(seq_dims[name], 1).flatten(0, 1)           # (B*T, ...): one row per new token
            # A pool is (num_blocks, ..., block_size, ...), its token axis where t has T.
            slots = (block, *[slice(None)] * (seq_dims[name] - 1), offset)
            self.pools[name][slots] = rows
        self.blocks._written(self)
        high = self.blocks.layout(self.device).high
        return tuple(self.pools[name][:high] for name in new)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block ``dst`` becomes a private copy of the shared block ``src``."""
        for pool in self.pools.values():
            pool[dst] = pool[src]

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
        """:func:`paged_attention` over the pools that ``update`` returned: blockwise when ``fused``."""
        return paged_attention(
            q, k, v, self.blocks.layout(q.device), is_causal=is_causal, scale=scale, blockwise=fused
        )


class PagedKVCache(PagedCache):
    """Keys and values for :class:`kqv.Attention` in blocks: two pools (num_blocks, H_kv, block_size, D)."""

    def __init__(
        self,
        blocks: BlockManager,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_kv_heads, None, head_dim)
        super().__init__(blocks, {"k": shape, "v": shape}, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) into their slots; return the pools (high, H_kv, block_size, D)."""
        return self._write({"k": k, "v": v}, {"k": 2, "v": 2})  # type: ignore[return-value]


class PagedLatentCache(PagedCache):
    """MLA's latent rows [c_kv ; k_rope] in blocks: one pool (num_blocks, block_size, d_c + d_r).

    The absorbed path reads the pool as one KV head, (num_blocks, 1,
    block_size, d_c + d_r), exactly as it reads a :class:`~kqv.cache.LatentCache`.
    """

    def __init__(
        self,
        blocks: BlockManager,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(blocks, {"latent": (None, kv_lora_rank + qk_rope_head_dim)}, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Write c_kv (B, T, d_c) and k_rope (B, T, d_r); return the pool (high, block_size, d_c + d_r)."""
        if c_kv.shape[-1] != self.kv_lora_rank or k_rope.shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"expected widths d_c={self.kv_lora_rank} and d_r={self.qk_rope_head_dim}, "
                f"got c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)}"
            )
        (pool,) = self._write({"latent": torch.cat((c_kv, k_rope), dim=-1)}, {"latent": 1})
        return pool


class PagedModelCache(ModelCache):
    """One paged cache per layer, all indexed by one :class:`BlockManager`.

    :class:`kqv.model.Decoder` calls :meth:`begin` before its layers run, so a
    forward pass over the selected sequences needs no other call.
    """

    def __init__(self, layers: Sequence[PagedCache]) -> None:
        super().__init__(layers)
        managers = {id(c.blocks) for c in self.layers}
        if len(managers) != 1:
            raise ValueError(f"the layers of a PagedModelCache must share one BlockManager, got {len(managers)}")
        self.blocks: BlockManager = self.layers[0].blocks

    def begin(self, batch_size: int, num_tokens: int) -> None:
        if batch_size != len(self.blocks.batch):
            raise ValueError(
                f"{len(self.blocks.batch)} sequences are selected ({self.blocks.batch}) but the input has {batch_size} rows"
            )
        self.blocks.begin(num_tokens)

    def select(self, rows: Sequence[int] | None = None) -> None:
        """Select sequences by id for the next steps (:meth:`BlockManager.select`); None: every live one."""
        self.blocks.select(sorted(self.blocks.tables) if rows is None else rows)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Free the sequences ``rows`` (by id), or forget every sequence."""
        if rows is None:
            self.blocks.reset()
        for seq in rows or ():
            self.blocks.free(seq)

    def __repr__(self) -> str:
        return f"PagedModelCache({len(self.layers)} x {type(self.layers[0]).__name__}, {self.blocks!r})"


def paged_cache(
    module: torch.nn.Module,
    blocks: BlockManager,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """The paged cache that an attention module or a whole decoder needs, on its device and dtype.

    ``module``: a :class:`kqv.Attention` (gives a :class:`PagedKVCache`), a
    :class:`kqv.MultiHeadLatentAttention` (a :class:`PagedLatentCache`), or a
    :class:`kqv.model.Decoder` (a :class:`PagedModelCache` of either).
    """
    from .attention import Attention
    from .mla import MultiHeadLatentAttention

    if hasattr(module, "layers"):
        return PagedModelCache([paged_cache(l.self_attn, blocks, dtype=dtype, device=device) for l in module.layers])
    if isinstance(module, MultiHeadLatentAttention):
        w = module.kv_b_proj.weight
        return PagedLatentCache(
            blocks, module.kv_lora_rank, module.qk_rope_head_dim, dtype=dtype or w.dtype, device=device or w.device
        )
    if isinstance(module, Attention):
        w = module.k_proj.weight
        return PagedKVCache(blocks, module.num_kv_heads, module.head_dim, dtype=dtype or w.dtype, device=device or w.device)
    raise TypeError(f"no paged cache for a {type(module).__name__}")


# --- 5. Continuous batching in miniature ------------------------------------------------


@torch.inference_mode()
def continuous_batching(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int | Sequence[int],
    *,
    blocks: BlockManager,
    max_batch: int | None = None,
    eos_token_id: int | None = None,
) -> tuple[list[torch.Tensor], list[dict]]:
    """Greedy generation for many prompts at once, requests joining and leaving between steps.

    Every step first admits waiting requests while the batch has room
    (``max_batch``) and the pool has blocks for their prompts: each is
    prefilled alone and gives its first token. Then all running requests
    decode one token together, whatever their lengths. A request that has its
    ``max_new_tokens`` (or produced ``eos_token_id``) leaves, and its blocks go
    back to the pool for the next one. (A real scheduler would also pause a
    request when the pool runs out mid-decode; here that raises.)

    Args:
        model: a :class:`kqv.model.Decoder`.
        prompts: token ids, one 1-D tensor per request, of any lengths.
        max_new_tokens: for all requests, or one number per request.
        blocks: an empty :class:`BlockManager`; its pool holds every request's tokens.
        max_batch: most requests decoding at once (default: all).

    Returns:
        ``(outputs, log)``: each request's prompt and generated tokens (as
        :meth:`kqv.model.Decoder.generate` returns for it alone), and one dict
        per step: ``admitted`` and ``decoded`` (request indices),
        ``finished``, ``blocks_in_use`` after the step, and ``tables`` and
        ``lengths``: each request still running after the step, its block
        table and the tokens it holds (a picture of the pool).
    """
    n = len(prompts)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(b < 1 for b in budgets):
        raise ValueError(f"need one max_new_tokens >= 1 per prompt ({n}), got {max_new_tokens}")
    cache = paged_cache(model, blocks)
    max_batch = max_batch or n
    device = next(model.parameters()).device
    waiting = list(range(n))
    running: dict[int, int] = {}                         # request -> sequence id
    generated: list[list[int]] = [[] for _ in range(n)]
    log: list[dict] = []

    def done(r: int) -> bool:
        return len(generated[r]) >= budgets[r] or (eos_token_id is not None and generated[r][-1] == eos_token_id)

    while waiting or running:
        admitted, finished = [], []
        while waiting and len(running) < max_batch:
            r = waiting[0]
            if math.ceil(len(prompts[r]) / blocks.block_size) > blocks.num_free:
                break                                        # wait for running requests to free blocks
            waiting.pop(0)
            seq = blocks.add()
            blocks.select([seq])
            logits = model(prompts[r].to(device).view(1, -1), cache=cache)        # (1, T_r, vocab)
            generated[r].append(int(logits[0, -1].argmax()))
            admitted.append(r)
            running[r] = seq
        if not running:
            raise RuntimeError(f"the pool of {blocks.num_blocks} blocks cannot hold prompt {waiting[0]} alone")
        decoding = [r for r in running if not done(r)]
        if decoding:
            blocks.select([running[r] for r in decoding])
            last = torch.tensor([[generated[r][-1]] for r in decoding], device=device)  # (B, 1)
            logits = model(last, cache=cache)                                          # (B, 1, vocab)
            for r, token in zip(decoding, logits[:, -1].argmax(-1).tolist()):
                generated[r].append(token)
        for r in [r for r in running if done(r)]:
            blocks.free(running.pop(r))
            finished.append(r)
        log.append({
            "admitted": admitted, "decoded": decoding, "finished": finished, "blocks_in_use": blocks.blocks_in_use,
            "tables": {r: list(blocks.tables[s]) for r, s in running.items()},
            "lengths": {r: blocks.lengths[s] for r, s in running.items()},
        })
    outputs = [torch.cat((p.to(device), torch.tensor(g, dtype=p.dtype, device=device))) for p, g in zip(prompts, generated)]
    return outputs, log
