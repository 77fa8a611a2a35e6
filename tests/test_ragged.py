"""Ragged batches: sequences of different lengths that join and leave, in every cache, against dense attention.

One random schedule drives each cache: every row is prefilled alone (in one or
two chunks), then random subsets of the rows, in random order, decode together;
now and then a sequence finishes and a new one takes its row. Each sequence's
outputs are then compared with dense attention over that sequence alone, with
no cache: plain causal attention (KVCache, LatentCache), attention over the
quantized keys and values (QuantizedKVCache, QuantizedLatentCache), attention
under the window's mask (SlidingWindowKVCache, SlidingWindowLatentCache).
"""

import random

import pytest
import torch

import kqv
from kqv.model import Decoder
from kqv.quant import FORMATS, dequantize, quantize, quantized_cache
from kqv.window import window_cache
from test_window import BASE, MODULES, make_module
from test_window import reference as window_reference

HIDDEN = 32
ROWS, STEPS, LONGEST_PROMPT = 3, 14, 9
MAX_LEN = LONGEST_PROMPT + STEPS


@torch.no_grad()
def run_ragged(module, cache, seed, device, *, rows=ROWS, steps=STEPS, width=HIDDEN):
    """Drive ``cache`` through a random ragged schedule.

    Returns {sequence: (inputs, outputs, chunks)}: inputs and outputs (1, L, ...),
    and the number of tokens of each forward pass that the sequence was in.

    ``module`` is an attention module (inputs are hidden vectors) or a decoder
    (inputs are token ids; its outputs are logits).
    """
    g = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    decoder = isinstance(module, Decoder)

    def new_input(b, n):
        if decoder:
            return torch.randint(0, module.config.vocab_size, (b, n), generator=gen).to(device)
        return torch.randn(b, n, width, generator=gen).to(device)

    seqs: dict[int, tuple[list, list]] = {}
    in_row: dict[int, int] = {}

    def join(row):
        """A new sequence takes ``row``: its prompt is prefilled alone."""
        seq = len(seqs)
        seqs[seq], in_row[row] = ([], []), seq
        cache.reset([row])
        cache.select([row])
        n = g.randint(1, LONGEST_PROMPT)
        cut = g.randint(1, n)
        for part in (cut, n - cut):
            if part:
                x = new_input(1, part)
                seqs[seq][0].append(x)
                seqs[seq][1].append(module(x, cache=cache))

    for row in range(rows):
        join(row)
    for _ in range(steps):
        batch = g.sample(range(rows), g.randint(1, rows))               # a subset, in any order
        cache.select(batch)
        x = new_input(len(batch), 1)
        out = module(x, cache=cache)                                    # (b, 1, ...)
        for i, row in enumerate(batch):
            seqs[in_row[row]][0].append(x[i : i + 1])
            seqs[in_row[row]][1].append(out[i : i + 1])
        if g.random() < 0.2:
            join(g.randrange(rows))                                     # one leaves, another joins
    return {s: (torch.cat(xs, 1), torch.cat(ys, 1), [x.shape[1] for x in xs]) for s, (xs, ys) in seqs.items()}


def was_ragged(log):
    """Sequences of different lengths were decoded (the schedule is random; make sure)."""
    return len({x.shape[1] for x, _, _ in log.values()}) > 1


@torch.no_grad()
def alone(module, cache, x, chunks):
    """One sequence through an empty cache of one row, in the same chunks as in the batch."""
    starts = [sum(chunks[:i]) for i in range(len(chunks))]
    return torch.cat([module(x[:, s : s + n], cache=cache) for s, n in zip(starts, chunks)], 1)


# --- dense references ---------------------------------------------------------------------

@torch.no_grad()
def dense_over_stored(module, x, format):
    """Causal attention over one sequence with no cache, its keys and values (or latents) stored in ``format``."""
    B, L, _ = x.shape
    if isinstance(module, kqv.MultiHeadLatentAttention):
        q_nope, q_rope, latent = module.project(x)
        d_c = module.kv_lora_rank
        group = 128 if d_c % 128 == 0 else d_c
        c_kv = dequantize(*quantize(latent[..., :d_c], format, group), x.dtype)
        latent = torch.cat((c_kv, latent[..., d_c:].bfloat16().to(x.dtype)), -1)   # FlashMLA: RoPE part in bf16
        attend = module._attend_absorbed if module.absorb else module._attend_naive
        out = attend(q_nope, q_rope, latent)
    else:
        q, k, v = module.project(x)
        k, v = (dequantize(*quantize(t, format, module.head_dim), x.dtype) for t in (k, v))
        out = kqv.scaled_dot_product_attention(q, k, v, is_causal=True)
    return module.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def check_against(log, reference, atol=1e-5):
    for seq, (x, out, _) in log.items():
        ref = reference(x)
        assert out.shape == ref.shape, seq
        assert torch.allclose(out, ref, atol=atol), f"sequence {seq}: {(out - ref).abs().max():.2e}"


# --- each cache against dense attention -------------------------------------------------------

@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_caches(device, kind, seed):
    module = make_module(kind, device)
    cache = module.new_cache(ROWS, MAX_LEN)
    log = run_ragged(module, cache, seed, device)
    assert was_ragged(log) and len(log) > ROWS
    check_against(log, lambda x: module(x))


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("format", ["int8", "fp8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_quantized_caches(device, kind, format, seed):
    if format not in FORMATS:
        pytest.skip("this torch has no float8_e4m3fn")
    module = make_module(kind, device)
    cache = quantized_cache(module, ROWS, MAX_LEN, format=format)
    log = run_ragged(module, cache, seed, device)
    assert was_ragged(log)
    check_against(log, lambda x: dense_over_stored(module, x, format))
    # It did quantize: the outputs differ from those over exact keys.
    assert any(not torch.allclose(out, module(x), atol=1e-5) for x, out, _ in log.values())


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("window, sinks", [(5, 0), (6, 2), (4, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_window_caches_at_text_positions(device, kind, window, sinks, seed):
    module = make_module(kind, device)
    cache = window_cache(module, ROWS, window, sinks=sinks, sink_positions="text")
    log = run_ragged(module, cache, seed, device)
    assert was_ragged(log) and max(x.shape[1] for x, _, _ in log.values()) > window   # the buffers rolled
    check_against(log, lambda x: window_reference(module, x, window, sinks, "text"))


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_window_caches_at_cache_positions_equal_each_row_alone(device, kind, seed):
    """StreamingLLM's positions move each row's sinks by that row's own length: as in a batch of one.

    (A batch of one at these positions is checked against StreamingLLM's
    definition in test_window.py; here the rows must not disturb each other.)
    """
    module = make_module(kind, device)
    cache = window_cache(module, ROWS, 6, sinks=2)
    log = run_ragged(module, cache, seed, device)
    assert was_ragged(log) and max(x.shape[1] for x, _, _ in log.values()) > 6
    for seq, (x, out, chunks) in log.items():
        ref = alone(module, window_cache(module, 1, 6, sinks=2), x, chunks)
        assert torch.allclose(out, ref, atol=1e-5), f"sequence {seq}: {(out - ref).abs().max():.2e}"


# --- whole decoders ---------------------------------------------------------------------------

MLA_CONFIG = BASE.replace(num_kv_heads=6, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


@pytest.mark.parametrize("config", [BASE, MLA_CONFIG], ids=["GQA", "MLA"])
@pytest.mark.parametrize("cache_kind", ["dense", "int8", "window"])
def test_decoder_over_a_ragged_batch(device, config, cache_kind):
    """A decoder's logits for each sequence of a ragged batch equal those of that sequence alone."""
    torch.manual_seed(1)
    model = Decoder(config).to(device).eval()

    def make(rows):
        if cache_kind == "dense":
            return model.new_cache(rows, MAX_LEN)
        if cache_kind == "int8":
            return quantized_cache(model, rows, MAX_LEN, format="int8")
        return window_cache(model, rows, 8, sinks=2, sink_positions="text")

    log = run_ragged(model, make(ROWS), 3, device)
    assert was_ragged(log)
    # A batch of three and a batch of one round differently in the last bit; an int8
    # cache can turn that into one step of 1/127 of a key's largest number.
    atol = 5e-3 if cache_kind == "int8" else 1e-4
    for seq, (ids, logits, chunks) in log.items():
        ref = alone(model, make(1), ids, chunks)
        assert torch.allclose(logits, ref, atol=atol), f"sequence {seq}: {(logits - ref).abs().max():.2e}"


# --- positions, masks, errors -------------------------------------------------------------------

def test_rows_hold_their_own_lengths_and_positions():
    cache = kqv.KVCache(3, 1, 8, 2)
    k = torch.randn(1, 1, 4, 2)
    cache.select([1])
    cache.update(k, k)
    assert cache.lengths == [0, 4, 0] and cache.length == 4 and cache.batch_size == 1
    cache.select(None)
    assert cache.batch_size == 3 and torch.equal(cache.next_position, torch.tensor([0, 4, 0]))
    cache.select([2, 0])
    assert cache.next_position == 0                          # rows 2 and 0 agree: one int
    cache.reset([1])
    assert cache.lengths == [0, 0, 0]


def test_window_rows_roll_apart():
    c = kqv.window.SlidingWindowKVCache(2, 1, 2, 4, sinks=1)
    k = torch.arange(6.0).view(1, 1, 3, 2)
    c.select([0])
    c.update(k, k)
    c.select(None)
    c.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    assert c.lengths == [4, 1] and torch.equal(c.seen, torch.tensor([4, 1]))
    assert c._mask.shape == (2, 1, 1, 4) and c._mask[1, 0, 0].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"different numbers of tokens, \[4, 1\]: pass seen"):
        c.slot_positions()


def test_errors_name_the_rows_and_lose_nothing():
    cache = kqv.KVCache(3, 1, 5, 2)
    with pytest.raises(ValueError, match=r"each in 0\.\.2 \(the cache has 3 rows\); got \[0, 3\]"):
        cache.select([0, 3])
    with pytest.raises(ValueError, match=r"distinct.*got \[1, 1\]"):
        cache.select([1, 1])
    with pytest.raises(ValueError, match=r"got \[\]"):
        cache.reset([])
    k = torch.randn(3, 1, 4, 2)
    cache.update(k, k)
    cache.select([0])
    cache.update(k[:1, :, :1], k[:1, :, :1])                  # row 0 is full: 5 of 5
    before = [b.clone() for b in cache.buffers.values()], list(cache.lengths)
    cache.select([2, 0])
    with pytest.raises(RuntimeError, match=r"row 0 holds 5 of max_len=5 tokens and cannot take 1 more"):
        cache.update(k[:2, :, :1], k[:2, :, :1])
    with pytest.raises(ValueError, match=r"k has shape \(3, 1, 1, 2\), the cache expects \(2, 1, 1, 2\)"):
        cache.update(k[:, :, :1], k[:, :, :1])
    assert all(torch.equal(a, b) for a, b in zip(before[0], cache.buffers.values()))
    assert cache.lengths == before[1] == [5, 4, 4]


def test_a_paged_model_cache_selects_and_frees_by_sequence_id():
    """The same two calls on a paged cache: select and reset take sequence ids (its rows are sequences)."""
    torch.manual_seed(1)
    model = Decoder(BASE).eval()
    blocks = kqv.paged.BlockManager(8, block_size=4)
    cache = kqv.paged.paged_cache(model, blocks)
    a, b = blocks.add(), blocks.add()
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        for seq in (a, b):
            cache.select([seq])
            model(ids, cache=cache)
        cache.select(None)
        assert blocks.batch == [a, b] and model(ids[:, :1].repeat(2, 1), cache=cache).shape == (2, 1, 97)
    cache.reset([a])
    assert list(blocks.tables) == [b] and blocks.lengths[b] == 7 and blocks.batch == [b]
    cache.reset()
    assert blocks.tables == {} and blocks.num_free == 8
