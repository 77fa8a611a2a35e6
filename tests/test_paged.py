"""kqv.paged: blocks equal dense per-sequence decoding; sharing, copy-on-write, bytes; errors keep the cache intact."""

import math

import pytest
import torch

import kqv
from kqv import configs
from kqv.attention import scaled_dot_product_attention
from kqv.model import Decoder
from kqv.paged import (
    BlockLayout,
    BlockManager,
    PagedKVCache,
    PagedLatentCache,
    continuous_batching,
    memory_waste,
    mixed_lengths,
    paged_attention,
    paged_cache,
)

from conftest import TOL

HIDDEN = 32


def make_attention(kind, device):
    torch.manual_seed(1)
    if kind == "MLA":
        m = kqv.MultiHeadLatentAttention(
            HIDDEN, 4, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5
        )
    else:
        m = kqv.Attention(HIDDEN, 4, {"MHA": 4, "GQA": 2, "MQA": 1}[kind], rope_theta=10000.0)
    return m.to(device).eval()


MODULES = ["MHA", "GQA", "MQA", "MLA"]


# --- what contiguous allocation wastes ---------------------------------------------------

def test_memory_waste_counts_slots():
    w = memory_waste([1, 16, 17, 100], max_len=128, block_size=16)
    assert w["used"] == 134
    assert w["contiguous"] == 4 * 128 and w["contiguous_waste"] == 4 * 128 - 134
    assert w["paged"] == 16 + 16 + 32 + 112 and w["paged_waste"] == w["paged"] - 134
    assert w["paged_waste_fraction"] == pytest.approx(w["paged_waste"] / w["paged"])


@pytest.mark.parametrize("block_size", [1, 8, 16, 64])
def test_paging_wastes_less_than_one_block_per_sequence(block_size):
    lengths = mixed_lengths(50, 10, 2000, seed=3)
    w = memory_waste(lengths, max_len=2000, block_size=block_size)
    assert 0 <= w["paged_waste"] < block_size * len(lengths)
    assert w["paged"] <= w["contiguous"]
    if block_size == 1:
        assert w["paged_waste"] == 0


def test_memory_waste_names_bad_lengths():
    with pytest.raises(ValueError, match=r"0..max_len=10, got \[11\]"):
        memory_waste([3, 11], max_len=10)


def test_mixed_lengths_are_reproducible_and_in_range():
    a = mixed_lengths(200, 64, 4096, seed=1)
    assert a == mixed_lengths(200, 64, 4096, seed=1) != mixed_lengths(200, 64, 4096, seed=2)
    assert min(a) >= 64 and max(a) <= 4096
    assert sorted(a)[100] < (64 + 4096) / 2  # many short, a few long
    with pytest.raises(ValueError, match="low=9, high=3"):
        mixed_lengths(3, 9, 3)


# --- the bookkeeping ----------------------------------------------------------------------

def test_free_list_hands_out_lowest_blocks_and_takes_them_back():
    blocks = BlockManager(8, 4)
    PagedKVCache(blocks, 1, 2)
    a, b = blocks.add(), blocks.add()
    blocks.select([a])
    blocks.begin(9)                              # 3 blocks
    blocks.cancel()
    assert blocks.tables[a] == [0, 1, 2] and blocks.lengths[a] == 0  # reserved, not yet written
    blocks.select([b])
    blocks.begin(2)
    assert blocks.tables[b] == [3]
    blocks.free(a)
    assert blocks.num_free == 7 and blocks.blocks_in_use == 1
    c = blocks.add()
    blocks.select([c])
    blocks.begin(1)
    assert blocks.tables[c] == [0]


@pytest.mark.parametrize("fused", [True, False])
def test_blocks_reserved_by_a_cancelled_step_are_harmless(fused):
    attn = make_attention("GQA", "cpu")
    attn.fused = fused
    blocks = BlockManager(8, 4)
    cache = paged_cache(attn, blocks)
    a = blocks.add()
    blocks.select([a])
    blocks.begin(11)                             # reserves blocks 0, 1, 2...
    blocks.cancel()                              # ...and is dropped: a holds nothing yet
    x = torch.randn(1, 3, HIDDEN)
    blocks.begin(2)
    with torch.no_grad():
        out = attn(x[:, :2], cache=cache)
        blocks.begin(1)
        out = torch.cat((out, attn(x[:, 2:], cache=cache)), 1)
        assert torch.allclose(out, attn(x), atol=1e-5)
    assert blocks.tables[a] == [0, 1, 2] and blocks.lengths[a] == 3


def test_fork_shares_blocks_and_copies_on_write():
    blocks = BlockManager(16, 4)
    cache = PagedKVCache(blocks, 1, 2)
    parent = blocks.add()
    blocks.select([parent])
    blocks.begin(6)                              # one full block, one half block
    cache.update(torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2))
    before = cache.pools["k"].clone()
    child = blocks.fork(parent)
    assert blocks.tables[child] == blocks.tables[parent] == [0, 1]
    assert blocks.refcount[:2] == [2, 2] and blocks.blocks_in_use == 2  # stored once
    blocks.select([child])
    blocks.begin(1)
    cache.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    # The full block stays shared; the half block the child writes into was copied first.
    assert blocks.tables[child] == [0, 2] and blocks.tables[parent] == [0, 1]
    assert blocks.refcount[:3] == [2, 1, 1]
    assert torch.equal(cache.pools["k"][2, :, :2], before[1, :, :2])  # the copy holds the shared tokens
    assert torch.equal(cache.pools["k"][2, :, 2], torch.ones(1, 2))   # and the child's new one
    assert torch.equal(cache.pools["k"][:2], before[:2])              # the parent's blocks are untouched
    blocks.free(parent)
    assert blocks.refcount[:3] == [1, 0, 1] and blocks.num_free == 14


# --- paged attention: both paths equal the reference ----------------------------------------

def random_layout(lengths, T, block_size, num_blocks, share=None, seed=0):
    """Random tables; with ``share`` (rows, blocks) the rows start with the same blocks."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lengths:
        need = math.ceil(n / block_size)
        tables.append([perm.pop() for _ in range(need)])
    if share:
        rows, k = share
        for r in rows[1:]:
            tables[r][:k] = tables[rows[0]][:k]
    return tables, BlockLayout.build(tables, lengths, T, block_size, num_blocks)


def reference_paged(q, k_pool, v_pool, tables, lengths, is_causal=True):
    """Per sequence: its keys in order, then plain attention in float64."""
    outs = []
    T = q.shape[2]
    for b, (table, n) in enumerate(zip(tables, lengths)):
        k = k_pool[table].transpose(0, 1).flatten(1, 2)[:, :n].double()        # (H_kv, n, D)
        v = v_pool[table].transpose(0, 1).flatten(1, 2)[:, :n].double()
        outs.append(scaled_dot_product_attention(q[b].double(), k, v, is_causal=is_causal))
    return torch.stack(outs)


@pytest.mark.parametrize("blockwise", [True, False])
@pytest.mark.parametrize("T, is_causal", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_paged_attention_equals_reference(device, blockwise, T, is_causal, dtype):
    lengths, bs, N, H, H_kv, D = [5, 17, 3, 40], 4, 40, 6, 2, 8
    tables, layout = random_layout(lengths, T, bs, N, share=([1, 3], 3))
    layout = BlockLayout.build(tables, lengths, T, bs, N, device=device)
    assert layout.extra_blocks.numel() == 3  # the second reader of each shared block
    k_pool = torch.randn(N, H_kv, bs, D, device=device, dtype=dtype)
    v_pool = torch.randn(N, H_kv, bs, D, device=device, dtype=dtype)
    q = torch.randn(len(lengths), H, T, D, device=device, dtype=dtype)
    out = paged_attention(q, k_pool, v_pool, layout, is_causal=is_causal, blockwise=blockwise)
    ref = reference_paged(q, k_pool, v_pool, tables, lengths, is_causal)
    assert out.shape == (4, H, T, D) and out.dtype == dtype
    assert torch.allclose(out.double(), ref, atol=TOL[dtype] * 5)


def test_block_table_outside_the_pool_is_named():
    with pytest.raises(IndexError, match=r"row 1 points to block 9, outside the pool of 8 blocks \(0..7\)"):
        BlockLayout.build([[0, 1], [2, 9]], [5, 5], 1, 4, 8)
    with pytest.raises(ValueError, match="row 0 holds 9 keys.*8 slots of its 2 blocks of 4"):
        BlockLayout.build([[0, 1]], [9], 1, 4, 8)


# --- the modules: ragged batches joining and leaving equal per-sequence dense decoding -------------

def dense_reference(module, xs):
    """Each sequence alone, in one dense cache: its chunks in order."""
    outs = []
    for chunks in xs:
        cache = module.new_cache(1, sum(c.shape[1] for c in chunks))
        outs.append([module(c, cache=cache) for c in chunks])
    return outs


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("fused", [True, False])
def test_ragged_batches_equal_dense_decoding(device, kind, fused):
    module = make_attention(kind, device)
    if kind != "MLA":
        module.fused = fused
    else:
        module.absorb = fused  # both MLA paths, each reading the pool its own way
    g = torch.Generator().manual_seed(5)
    prompts = [7, 1, 20, 4]
    # Sequence i joins at step joins[i] (its prompt prefilled alone) and decodes until leaves[i].
    joins, leaves = [0, 0, 2, 5], [9, 4, 9, 7]
    xs = [[torch.randn(1, n, HIDDEN, generator=g).to(device)] for n in prompts]
    for i in range(4):
        xs[i] += [torch.randn(1, 1, HIDDEN, generator=g).to(device) for _ in range(leaves[i] - joins[i])]
    expected = dense_reference(module, xs)

    blocks = BlockManager(64, 4)
    cache = paged_cache(module, blocks)
    ids, got = {}, {i: [] for i in range(4)}
    with torch.no_grad():
        for step in range(10):
            for i in range(4):
                if joins[i] == step:                     # joins: its prompt alone
                    ids[i] = blocks.add()
                    blocks.select([ids[i]])
                    blocks.begin(prompts[i])
                    got[i].append(module(xs[i][0], cache=cache))
            running = [i for i in ids if joins[i] <= step < leaves[i]]
            if running:                                  # one decode step for every running sequence
                blocks.select([ids[i] for i in running])
                blocks.begin(1)
                x = torch.cat([xs[i][step - joins[i] + 1] for i in running])
                out = module(x, cache=cache)
                for row, i in enumerate(running):
                    got[i].append(out[row : row + 1])
            for i in [i for i in ids if leaves[i] == step + 1]:
                blocks.free(ids.pop(i))                  # leaves: its blocks return to the pool
    for i in range(4):
        assert len(got[i]) == len(expected[i])
        for a, b in zip(got[i], expected[i]):
            assert torch.allclose(a, b, atol=1e-5), (kind, i)
    assert blocks.num_free == 64


BASE = configs.get("HuggingFaceTB/SmolLM2-135M-Instruct").replace(
    name="tiny", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8,
    vocab_size=97, intermediate_size=64,
)
DECODERS = {
    "GQA": (BASE, False),
    "MLA absorbed": (BASE.replace(num_kv_heads=6, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                  v_head_dim=8), True),
}


def decoder(name, device):
    torch.manual_seed(1)
    config, absorb = DECODERS[name]
    return Decoder(config, absorb=absorb).to(device).eval()


@pytest.mark.parametrize("name", DECODERS)
def test_continuous_batching_generates_what_each_prompt_generates_alone(device, name):
    model = decoder(name, device)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g).to(device) for n in (5, 12, 3, 9, 17, 2)]
    budgets = [4, 7, 2, 6, 3, 5]
    outputs, log = continuous_batching(model, prompts, budgets, blocks=BlockManager(20, 4), max_batch=3)
    for p, out, n in zip(prompts, outputs, budgets):
        assert torch.equal(out, model.generate(p[None], n)[0])
    assert max(len(step["decoded"]) for step in log) == 3                  # the batch was full...
    assert any(step["admitted"] and step["decoded"] for step in log[1:])   # ...and requests joined mid-way
    assert sorted(r for step in log for r in step["finished"]) == list(range(6))
    assert log[-1]["blocks_in_use"] == 0


def test_continuous_batching_logs_the_pool_after_each_step(device):
    model = decoder("GQA", device)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=g).to(device) for n in (6, 13, 2, 9)]
    budgets = [5, 3, 8, 4]
    _, log = continuous_batching(model, prompts, budgets, blocks=BlockManager(12, 4), max_batch=2)
    held = {}
    for step in log:
        for r in step["admitted"]:
            held[r] = len(prompts[r])                    # its prompt, then one token per decode step
        for r in step["decoded"]:
            held[r] += 1
        for r in step["finished"]:
            del held[r]
        # The log's lengths are the tokens each running request holds; its table has just enough blocks.
        assert step["lengths"] == held
        assert set(step["tables"]) == set(held)
        for r, table in step["tables"].items():
            assert len(table) == math.ceil(step["lengths"][r] / 4)
        used = [b for table in step["tables"].values() for b in table]
        assert len(used) == len(set(used)) == step["blocks_in_use"]    # no block held twice
    assert log[-1]["tables"] == {} and log[-1]["lengths"] == {}


@pytest.mark.parametrize("name", DECODERS)
def test_generate_decodes_into_a_paged_cache(device, name):
    model = decoder(name, device)
    blocks = BlockManager(16, 4)
    cache = paged_cache(model, blocks)
    blocks.select([blocks.add(), blocks.add()])
    ids = torch.randint(0, 97, (2, 6), device=device)
    assert torch.equal(model.generate(ids, 7, cache=cache), model.generate(ids, 7))
    assert list(blocks.lengths.values()) == [12, 12]   # the last token is returned, not fed back


def test_a_shared_system_prompt_is_stored_once(device):
    model = decoder("GQA", device)
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 97, (1, 10), generator=g).to(device)
    users = [torch.randint(0, 97, (1, n), generator=g).to(device) for n in (3, 6, 1)]
    blocks = BlockManager(32, 4)
    cache = paged_cache(model, blocks)
    root = blocks.add()
    blocks.select([root])
    with torch.no_grad():
        model(system, cache=cache)                              # the system prompt, once
        seqs, got = [], []
        for user in users:
            seqs.append(blocks.fork(root))
            blocks.select([seqs[-1]])
            got.append(model(user, cache=cache))                # each user prompt after it
        # The root holds 2 full blocks and 2 tokens of a third; each child shares the full ones,
        # copies the third and adds what it needs: 10+3 and 10+6 tokens take 4 blocks, 10+1 takes 3.
        assert blocks.blocks_in_use == 3 + 2 + 2 + 1
        assert all(blocks.tables[s][:2] == blocks.tables[root][:2] for s in seqs)
        blocks.select(seqs)
        step = model(torch.tensor([[5], [6], [7]], device=device), cache=cache)
    for i, user in enumerate(users):
        with torch.no_grad():
            alone = model(torch.cat((system, user, torch.tensor([[5 + i]], device=device)), 1))
        assert torch.allclose(got[i], alone[:, 10 : 10 + user.shape[1]], atol=1e-4)
        assert torch.allclose(step[i], alone[0, -1:], atol=1e-4)


# --- sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_are_what_the_pools_occupy(device, dtype):
    blocks = BlockManager(10, 16)
    kv = PagedKVCache(blocks, 3, 8, dtype=dtype, device=device)
    latent = PagedLatentCache(blocks, 12, 4, dtype=dtype, device=device)
    e = torch.empty((), dtype=dtype).element_size()
    for cache, per_token in ((kv, 2 * 3 * 8 * e), (latent, (12 + 4) * e)):
        assert cache.bytes_per_token == per_token
        assert cache.nbytes == sum(p.element_size() * p.numel() for p in cache.pools.values())
        assert cache.nbytes == 10 * 16 * per_token
    assert kv.pools["k"].shape == (10, 3, 16, 8) and latent.pools["latent"].shape == (10, 16, 16)


# --- errors name the values and keep what is cached ------------------------------------------------

def snapshot(blocks, cache):
    return (
        {n: p.clone() for n, p in cache.pools.items()},
        {s: list(t) for s, t in blocks.tables.items()}, dict(blocks.lengths), list(blocks.refcount),
    )


def assert_same(a, b):
    assert all(torch.equal(a[0][n], b[0][n]) for n in a[0]) and a[1:] == b[1:]


def test_errors_name_the_values_and_lose_nothing():
    attn = make_attention("GQA", "cpu")
    blocks = BlockManager(5, 4)
    cache = paged_cache(attn, blocks)
    a, b = blocks.add(), blocks.add()
    x = torch.randn(1, 7, HIDDEN)
    with torch.no_grad():
        for seq in (a, b):
            blocks.select([seq])
            blocks.begin(7)
            attn(x, cache=cache)
        ref = attn.new_cache(1, 9)
        attn(x, cache=ref)
    before = snapshot(blocks, cache)
    with pytest.raises(KeyError, match=r"sequence 7 is unknown: the live sequences are \[0, 1\]"):
        blocks.select([a, 7])
    blocks.free(b)
    after_free = snapshot(blocks, cache)
    with pytest.raises(KeyError, match="sequence 1 has finished"):
        blocks.select([b])
    with pytest.raises(KeyError, match="sequence 1 has finished"):
        blocks.fork(b)
    with pytest.raises(ValueError, match=r"appears twice in the batch \[0, 0\]"):
        blocks.select([a, a])
    blocks.select([a])
    with pytest.raises(RuntimeError, match="needs 4 more blocks of 4 tokens but only 3 of 5 are free"):
        blocks.begin(14)
    with pytest.raises(RuntimeError, match="no step is waiting"):
        cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    blocks.begin(1)
    with pytest.raises(ValueError, match=r"k has shape \(1, 3, 1, 8\), the cache expects \(1, 2, 1, 8\)"):
        cache.update(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    with pytest.raises(ValueError, match="begun for 1 sequences of 1 new tokens, the cache was given 1 of 2"):
        cache.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(TypeError, match="float16, the cache holds torch.float32"):
        cache.update(torch.randn(1, 2, 1, 8).half(), torch.randn(1, 2, 1, 8).half())
    with pytest.raises(TypeError, match="int64"):
        PagedKVCache(blocks, 1, 2, dtype=torch.int64)
    now = snapshot(blocks, cache)
    assert torch.equal(now[0]["k"][:2], before[0]["k"][:2]) and now[2] == after_free[2]  # a's tokens intact
    # and decoding goes on as if nothing had happened
    y = torch.randn(1, 1, HIDDEN)
    with torch.no_grad():
        assert torch.allclose(attn(y, cache=cache), attn(y, cache=ref), atol=1e-5)
    assert blocks.lengths[a] == 8


def test_a_half_written_step_must_be_finished_or_cancelled():
    model = decoder("GQA", "cpu")
    blocks = BlockManager(8, 4)
    cache = paged_cache(model, blocks)
    blocks.select([blocks.add()])
    blocks.begin(3)
    with torch.no_grad():
        model.layers[0].self_attn(torch.randn(1, 3, 48), cache=cache[0])  # one layer of two
    with pytest.raises(RuntimeError, match="1 of the 2 caches on this BlockManager have written"):
        blocks.select([0])
    assert blocks.lengths[0] == 0  # nothing committed
    blocks.cancel()
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 3)), cache=cache)
    assert blocks.lengths[0] == 3


def test_decoder_batch_must_match_the_selection():
    model = decoder("GQA", "cpu")
    blocks = BlockManager(8, 4)
    cache = paged_cache(model, blocks)
    blocks.select([blocks.add()])
    with pytest.raises(ValueError, match=r"1 sequences are selected \(\[0\]\) but the input has 2 rows"):
        model(torch.randint(0, 97, (2, 3)), cache=cache)
