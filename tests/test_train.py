"""Training small decoders: the loop lowers the loss, repeats itself exactly, and resumes."""

import pytest
import torch

from kqv import train
from kqv.configs import ModelConfig, kv_elements_per_token
from kqv.model import Decoder

TINY = ModelConfig("tiny", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8,
                   vocab_size=64, intermediate_size=64, tie_word_embeddings=True)
SETTINGS = train.TrainSettings(steps=30, batch_size=8, seq_len=16, lr=1e-2, warmup=3, log_every=5,
                               checkpoint_every=10, precision="fp32")


def stream(n=4000, seed=0):
    """A token stream with structure to learn: each token is the previous plus 1, mostly."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 64, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.8
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    for i in range(1, n):
        out[i] = (out[i - 1] + 1) % 64 if keep[i] else noise[i]
    return out


def fresh(seed=0, config=TINY):
    torch.manual_seed(seed)
    model = Decoder(config)
    train.init_weights(model)
    return model


def test_training_lowers_the_loss():
    history = train.train_lm(fresh(), stream(), SETTINGS, seed=0)
    losses = [loss for _, loss in history["losses"]]
    assert losses[-1] < 0.6 * losses[0]
    assert history["tokens"] == 30 * 8 * 16


def test_two_runs_with_the_same_seed_give_the_same_numbers():
    a, b = fresh(), fresh()
    ha, hb = train.train_lm(a, stream(), SETTINGS, seed=1), train.train_lm(b, stream(), SETTINGS, seed=1)
    assert ha["losses"] == hb["losses"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = fresh()
    assert train.train_lm(c, stream(), SETTINGS, seed=2)["losses"] != ha["losses"]   # the seed matters


def test_a_stopped_run_continues_from_its_checkpoint(tmp_path):
    whole = fresh()
    expected = train.train_lm(whole, stream(), SETTINGS, seed=0)

    class Stop(Exception):
        pass

    def stop_at_17(step, loss):
        if step == 17:
            raise Stop

    path = tmp_path / "run.pt"
    with pytest.raises(Stop):
        train.train_lm(fresh(), stream(), SETTINGS, seed=0, checkpoint=path, progress=stop_at_17)
    assert train.load_checkpoint(path)["step"] == 10                    # the last checkpoint before the stop
    resumed, steps = fresh(), []
    history = train.train_lm(resumed, stream(), SETTINGS, seed=0, checkpoint=path,
                             progress=lambda step, loss: steps.append(step))
    assert steps == list(range(11, 31))                                 # only the steps after the checkpoint
    assert history["losses"] == expected["losses"]
    assert all(torch.equal(x, y) for x, y in zip(resumed.state_dict().values(), whole.state_dict().values()))


def test_batches_depend_only_on_seed_and_step():
    tokens = torch.arange(1000)
    a = train.sample_batch(tokens, 4, 16, seed=0, step=5)
    assert a.shape == (4, 17)
    assert torch.equal(a, train.sample_batch(tokens, 4, 16, seed=0, step=5))
    assert not torch.equal(a, train.sample_batch(tokens, 4, 16, seed=0, step=6))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 16, dtype=torch.long))   # contiguous windows
    with pytest.raises(ValueError, match=r"longer than seq_len \+ 1 = 17, got \(10,\)"):
        train.sample_batch(torch.arange(10), 4, 16, seed=0, step=0)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    lrs = [train.lr_at(s, 100, 1.0, 10, final=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_designs_have_equal_parameter_counts():
    base = TINY.replace(num_heads=8, num_kv_heads=8, head_dim=4, intermediate_size=80)
    designs = train.design_configs(base, {
        "MHA": {}, "GQA-2": {"num_kv_heads": 2}, "MQA": {"num_kv_heads": 1},
        "MLA": {"kv_lora_rank": 12, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4},
    })
    counts = {name: train.count_parameters(Decoder(c)) for name, c in designs.items()}
    unit = 3 * base.hidden_size * base.num_layers                       # one more MLP column in every layer
    assert all(abs(n - counts["MHA"]) <= unit / 2 for n in counts.values()), counts
    assert designs["MQA"].intermediate_size > designs["MHA"].intermediate_size
    assert [kv_elements_per_token(c, per_layer=True) for c in designs.values()] == [64, 16, 8, 16]


def test_bpe_is_deterministic_and_byte_level():
    texts = ["def attention(q, k, v):\n    return softmax(q @ k.T) @ v\n"] * 20 + ["The cache keeps keys."] * 20
    a, b = train.train_bpe(texts, 300), train.train_bpe(texts, 300)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() <= 300
    text = "naïve ünïcode"                                              # never seen: still encoded, byte by byte
    assert a.decode(a.encode(text).ids) == text


def test_precision_is_named():
    assert train.autocast_dtype("cpu", "fp32") is None
    assert train.autocast_dtype("cpu", "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match=r"precision must be 'auto', 'fp32' or 'bf16', got 'half'"):
        train.autocast_dtype("cpu", "half")
