"""Repairing converted models by distillation: it brings them closer, keeps their cache, and resumes."""

import pytest
import torch

from kqv import convert, evaluate, uptrain
from kqv.configs import ModelConfig
from kqv.model import Decoder

CONFIG = ModelConfig("tiny GQA", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                     vocab_size=50, intermediate_size=64)
SETTINGS = uptrain.RepairSettings(layer_steps=15, layer_batch=2, layer_lr=3e-3, logit_steps=6, logit_batch=2,
                                  logit_lr=1e-3, top_k=8, warmup=2, precision="fp32")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return Decoder(CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def data(teacher):
    g = torch.Generator().manual_seed(1)
    layer_tokens = torch.randint(0, 50, (6, 16), generator=g)
    logit_tokens = torch.randint(0, 50, (SETTINGS.logit_steps, SETTINGS.logit_batch, 16), generator=g)
    return uptrain.teacher_data(teacher, layer_tokens, logit_tokens, top_k=SETTINGS.top_k, precision="fp32")


def kl_to(teacher, student, tokens):
    with torch.no_grad():
        p = teacher(tokens).log_softmax(-1)
        return float((p.exp() * (p - student(tokens).log_softmax(-1))).sum(-1).mean())


def test_top_k_kl_is_the_kl_when_k_is_the_vocabulary():
    teacher, student = torch.randn(3, 5, 10), torch.randn(3, 5, 10)
    p, q = teacher.log_softmax(-1), student.log_softmax(-1)
    full = (p.exp() * (p - q)).sum(-1).mean()
    top = p.topk(10, dim=-1)
    torch.testing.assert_close(uptrain.top_k_kl(student, top.values, top.indices), full, atol=1e-5, rtol=0)
    few = p.topk(3, dim=-1)
    assert 0 <= uptrain.top_k_kl(student, few.values, few.indices) <= full + 1e-6   # a coarser KL is smaller
    assert uptrain.top_k_kl(teacher, few.values, few.indices) == pytest.approx(0, abs=1e-6)


def test_teacher_data_shapes(data):
    assert len(data.layer_inputs) == 2 and data.layer_inputs[0].shape == (6, 16, 32)
    assert data.top_logprobs.shape == data.top_ids.shape == (SETTINGS.logit_steps, 2, 16, 8)


@pytest.mark.parametrize("convert_fn, per_layer", [
    (lambda m: convert.gqa_to_mqa(m), 2 * 1 * 8),                    # one K and one V head of width 8
    (lambda m: convert.gqa_to_latent(m, 8), 8),                      # a latent of width 8
    (lambda m: convert.gqa_to_decoupled_latent(m, 8, 4, absorb=False), 8 + 2 * 4),   # latent + RoPE keys
], ids=["mqa", "latent", "mla"])
def test_repair_brings_a_conversion_closer_and_keeps_its_cache(teacher, data, convert_fn, per_layer):
    student = convert_fn(teacher)
    claimed = per_layer * CONFIG.num_layers * 2                      # bytes per token in bfloat16
    assert evaluate.cache_bytes_per_token(student, torch.bfloat16) == claimed
    held_out = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(9))
    before = kl_to(teacher, student, held_out)
    report = uptrain.repair(student, teacher, data, SETTINGS, seed=0)
    assert kl_to(teacher, student, held_out) < before
    assert all(r["relative_error_after"] <= r["relative_error_before"] for r in report["layers"])
    assert len(report["logit_losses"]) == SETTINGS.logit_steps
    # The same cache: as many bytes per token, and really used by decoding.
    assert evaluate.cache_bytes_per_token(student, torch.bfloat16) == claimed
    assert not any(p.requires_grad for p in student.parameters())
    tokens = held_out[:1]
    with torch.no_grad():
        full = student(tokens)
        cache = student.new_cache(1, 16)
        steps = [student(tokens[:, :8], cache=cache)] + [student(tokens[:, t:t + 1], cache=cache) for t in range(8, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.nbytes == 16 * evaluate.cache_bytes_per_token(student)


def test_repair_changes_only_attention(teacher, data):
    student = convert.gqa_to_mqa(teacher)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "self_attn" not in k}
    uptrain.repair(student, teacher, data, SETTINGS, seed=0)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in frozen.items())


def test_a_stopped_repair_continues_to_the_same_result(teacher, data, tmp_path):
    whole = convert.gqa_to_mqa(teacher)
    uptrain.repair(whole, teacher, data, SETTINGS, seed=0)

    class Stop(Exception):
        pass

    count = {"n": 0}

    def stop_in_phase_two(n):
        count["n"] += n
        if count["n"] >= 2 * SETTINGS.layer_steps + 4:               # both layers done, 4 logit steps in
            raise Stop

    stopped = convert.gqa_to_mqa(teacher)
    with pytest.raises(Stop):
        uptrain.repair(stopped, teacher, data, SETTINGS, seed=0, checkpoint_dir=tmp_path,
                       progress=stop_in_phase_two, checkpoint_every=2)
    resumed, calls = convert.gqa_to_mqa(teacher), []
    report = uptrain.repair(resumed, teacher, data, SETTINGS, seed=0, checkpoint_dir=tmp_path,
                            checkpoint_every=2, progress=calls.append)
    # Stopped during logit step 4, before its checkpoint: both layers and 2 logit steps come back
    # from the checkpoints, and only the last 4 steps are trained again.
    assert calls == [SETTINGS.layer_steps, SETTINGS.layer_steps, 2, 1, 1, 1, 1]
    assert len(report["logit_losses"]) == SETTINGS.logit_steps
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_layer_that_training_makes_worse_keeps_its_weights(teacher, data):
    student = convert.gqa_to_latent(teacher, 8)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    wild = uptrain.RepairSettings(layer_steps=5, layer_batch=2, layer_lr=10.0, logit_steps=0, warmup=1,
                                  precision="fp32")
    report = uptrain.repair(student, teacher, data, wild, seed=0)
    assert all(r["relative_error_after"] == r["relative_error_before"] for r in report["layers"])
    assert all(torch.equal(student.state_dict()[k], v) for k, v in start.items())
