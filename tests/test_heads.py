"""Attention maps of a real model, and the scores that find heads of a kind."""

import pytest
import torch

from kqv import heads, smollm2
from kqv.attention import repeat_kv

pytest_plugins = ["conftest_smollm2"]

SENTENCE = "Three parts of Earth are Crust, Mantle and"
TEXT = (
    "A library is a building full of answers, but only if you know how to ask. The visitor walks in "
    "with a question, reads the labels on the spines, and pulls out the books whose labels match best. "
    "Then she reads the pages, and blends what they say into one answer."
)


# --- Scores on maps built by hand: each must find exactly its own pattern ----------------


def one_hot_map(T, key_of):
    """A (1, T, T) map where query t puts all its weight on key key_of(t)."""
    m = torch.zeros(1, T, T)
    for t in range(T):
        m[0, t, key_of(t)] = 1.0
    return m


def test_previous_token_and_sink_heads_do_not_score_as_each_other():
    """Query 1's previous token is token 0: the scores start later, so a sink is not a previous-token head."""
    T = 9
    prev = one_hot_map(T, lambda t: max(t - 1, 0))
    first = one_hot_map(T, lambda t: 0)
    assert heads.previous_token_score(prev).item() == pytest.approx(1.0)
    assert heads.first_token_score(first).item() == pytest.approx(1.0)
    assert heads.first_token_score(prev).item() == 0.0
    assert heads.previous_token_score(first).item() == 0.0
    # Counting from query 1, as before, each would score 1 / (T - 1) as the other.
    assert heads.previous_token_score(first, first_query=2).item() == 0.0


def test_a_head_without_preference_scores_near_chance_only():
    """Uniform weights: query t puts 1 / (t + 1) on each key; the early rows, where that is large, are left out."""
    T = 12
    uniform = torch.ones(1, T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    chance = torch.tensor([1 / (t + 1) for t in range(heads.FIRST_QUERY, T)]).mean()
    assert heads.first_token_score(uniform).item() == pytest.approx(chance.item())
    assert heads.previous_token_score(uniform).item() == pytest.approx(chance.item())
    assert heads.first_token_score(uniform).item() < heads.first_token_score(uniform, first_query=2).item()


def test_first_query_is_checked():
    maps = torch.ones(1, 6, 6).tril() / 6
    with pytest.raises(ValueError, match=r"first_query must be at least 2 .* below T=6, got 1"):
        heads.previous_token_score(maps, first_query=1)
    with pytest.raises(ValueError, match="below T=6, got 6"):
        heads.first_token_score(maps, first_query=6)


def test_induction_and_duplicate_scores_on_a_repeated_sequence():
    n = 5
    ids = torch.tensor([10, 11, 12, 13, 14] * 2)
    T = 2 * n
    induction = one_hot_map(T, lambda t: t - n + 1 if t >= n else t)
    duplicate = one_hot_map(T, lambda t: t - n if t >= n else t)
    assert heads.induction_score(induction, ids).item() == pytest.approx(1.0)
    assert heads.duplicate_token_score(induction, ids).item() == pytest.approx(0.0)
    assert heads.duplicate_token_score(duplicate, ids).item() == pytest.approx(1.0)
    assert heads.induction_score(duplicate, ids).item() == pytest.approx(0.0)


def test_punctuation_score_counts_weight_on_punctuation_keys():
    T = 6
    is_punct = torch.tensor([False, True, False, False, True, False])
    on_comma = one_hot_map(T, lambda t: 1 if t >= 1 else 0)
    on_self = one_hot_map(T, lambda t: t)
    assert heads.punctuation_score(on_comma, is_punct).item() == pytest.approx(1.0)
    # Queries 2..5 attend to themselves; only query 4 is punctuation.
    assert heads.punctuation_score(on_self, is_punct).item() == pytest.approx(1 / 4)


def test_scores_reject_prompts_that_cannot_score():
    with pytest.raises(ValueError, match="no token repeats"):
        heads.induction_score(torch.ones(1, 3, 3) / 3, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no punctuation"):
        heads.punctuation_score(torch.ones(1, 3, 3) / 3, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must end in a square \(T, T\), got shape \(2, 3\)"):
        heads.previous_token_score(torch.zeros(2, 3))


def test_repeated_random_tokens():
    ids = heads.repeated_random_tokens(8, 100, seed=3, low=17)
    assert ids.shape == (1, 16)
    assert torch.equal(ids[0, :8], ids[0, 8:])
    assert ids.min() >= 17 and ids.max() < 100
    assert len(set(ids[0, :8].tolist())) == 8
    assert torch.equal(ids, heads.repeated_random_tokens(8, 100, seed=3, low=17))


def test_rank_heads_sorts_and_locates():
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.0, 0.3]])
    rows = heads.rank_heads(scores, top=3)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 1), (1, 0), (1, 2)]
    assert [r["score"] for r in rows] == pytest.approx([0.9, 0.8, 0.3])
    assert len(heads.rank_heads(scores, top=100)) == 6


# --- On the real model ----------------------------------------------------------


def test_hidden_states_rebuild_the_logits(smol_model, smol_tokenizer):
    ids = smollm2.encode(smol_tokenizer, SENTENCE)
    states = heads.hidden_states(smol_model, ids)
    assert len(states) == 31
    assert all(s.shape == (1, ids.shape[1], 576) for s in states)
    logits = smol_model.lm_head(smol_model.norm(states[-1]))
    torch.testing.assert_close(logits, smol_model(ids), atol=1e-4, rtol=0)


def test_attention_maps_are_causal_distributions(smol_model, smol_tokenizer):
    ids = smollm2.encode(smol_tokenizer, SENTENCE)
    T = ids.shape[1]
    maps = heads.attention_maps(smol_model, ids)
    assert maps.shape == (30, 9, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(30, 9, T))
    assert torch.equal(maps.triu(1), torch.zeros_like(maps))
    some = heads.attention_maps(smol_model, ids[0], layers=[7, 2, -24])
    torch.testing.assert_close(some, maps[[7, 2, 6]])
    torch.testing.assert_close(heads.attention_weights(smol_model, ids, 5, 4), maps[5, 4])


def test_maps_are_the_weights_the_layer_really_uses(smol_model, smol_tokenizer):
    """The map of a layer, times its values, through o_proj, is that layer's attention output."""
    ids = smollm2.encode(smol_tokenizer, SENTENCE)
    layer_index = 3
    layer = smol_model.layers[layer_index]
    x = layer.input_layernorm(heads.hidden_states(smol_model, ids)[layer_index])
    maps = heads.attention_maps(smol_model, ids, layers=[layer_index])[0]        # (H, T, T)
    _, _, v = layer.self_attn.project(x)                                         # (1, H_kv, T, D)
    out = maps @ repeat_kv(v, 3)[0]                                              # (H, T, D)
    rebuilt = layer.self_attn.o_proj(out.transpose(0, 1).reshape(1, ids.shape[1], 576))
    torch.testing.assert_close(rebuilt, layer.self_attn(x), atol=1e-5, rtol=1e-4)


def test_errors_name_the_offending_values(smol_model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(IndexError, match="layer 30 out of range: the model has 30 layers"):
        heads.attention_maps(smol_model, ids, layers=[30])
    with pytest.raises(IndexError, match="head 9 out of range: layer 0 has 9 heads"):
        heads.attention_weights(smol_model, ids, 0, 9)
    with pytest.raises(ValueError, match=r"got \(2, 3\)"):
        heads.attention_maps(smol_model, torch.zeros(2, 3, dtype=torch.long))


@pytest.fixture(scope="module")
def scores(smol_model, smol_tokenizer):
    return heads.head_scores(smol_model, smol_tokenizer, TEXT)


def test_head_scores_cover_all_270_heads(scores):
    assert set(scores) == {"previous_token", "first_token", "punctuation", "duplicate_token", "induction"}
    for kind, s in scores.items():
        assert s.shape == (30, 9), kind
        assert bool(((s >= 0) & (s <= 1 + 1e-5)).all()), kind


def test_a_real_previous_token_head_exists(smol_model, smol_tokenizer, scores):
    """The article's 'who is near whom' librarian is real: one head looks at the previous token."""
    best = heads.rank_heads(scores["previous_token"], top=1)[0]
    assert best["score"] > 0.5
    assert scores["previous_token"].median() < 0.2          # ... and it is a specialist, not the rule
    ids = smollm2.encode(smol_tokenizer, SENTENCE)
    weights = heads.attention_weights(smol_model, ids, best["layer"], best["head"])
    links = heads.strongest_links(weights, heads.token_strings(smol_tokenizer, ids))
    assert links[0]["distance"] == 0                        # the first token can only see itself
    assert sum(row["distance"] == 1 for row in links[1:]) >= 0.8 * (len(links) - 1)


def test_real_induction_heads_exist_and_are_rare(scores):
    induction = scores["induction"]
    assert induction.max() > 0.5
    assert induction.median() < 0.1
    assert (induction > 0.5).sum() < 27                      # fewer than a tenth of the heads


def test_punctuation_and_first_token_heads_exist(scores):
    assert scores["first_token"].max() > 0.9                # attention sinks
    assert scores["punctuation"].max() > 0.3


def test_token_strings_and_punctuation_mask(smol_tokenizer):
    ids = smollm2.encode(smol_tokenizer, SENTENCE)
    tokens = heads.token_strings(smol_tokenizer, ids)
    assert "".join(tokens) == SENTENCE
    mask = heads.punctuation_mask(smol_tokenizer, ids)
    assert [t for t, p in zip(tokens, mask.tolist()) if p] == [","]
