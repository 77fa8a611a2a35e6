"""Repairing a converted model: uptraining in miniature, by distillation from the original.

A conversion (:mod:`kqv.convert`) shrinks the cache of a trained model and
damages it; measured without retraining, that damage is the cost of the
*conversion*, not of the design. Ainslie et al. (2023, arXiv 2305.13245)
convert multi-head checkpoints to MQA and GQA and then uptrain them "using 5%
of original pre-training compute"; MHA2MLA (Ji et al. 2025, arXiv 2502.14837)
recovers models converted to MLA, SmolLM-135M among them, with 0.3% to 0.6% of
the pretraining data (its arXiv abstract; the ACL 2025 version says 0.6% to 1%).
This module does the same, scaled down to what a laptop's CPU does in minutes,
in two phases, with the original model as the teacher:

1. **Layers.** Each converted attention layer reads the inputs the original
   layer saw (the teacher's activations, X_l) and learns to give the original's
   output: loss ``mean((A'_l(X_l) - A_l(X_l))^2) / mean(A_l(X_l)^2)``, the
   relative error. Layers are independent here, so each is fitted alone.
2. **Logits.** The whole converted model learns to give the original's
   next-token distribution: KL(teacher || student) over the teacher's top-k
   tokens plus one bucket for all the others (the KL of that coarser
   distribution, a lower bound of the full one, for which k numbers per token
   are stored instead of 49,152).

Only attention parameters change (the embeddings, MLPs and norms stay the
original's), and the student learns the teacher's distribution, not the text:
it can approach the original, not learn the domain of the training text and
pass it. Every conversion gets the same tokens and the same steps.

Book: chapter 12, "What each catalog costs"; chapters 6 to 9 (the conversions).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .train import _generator, autocast, autocast_dtype, load_checkpoint, lr_at, save_checkpoint

__all__ = ["RepairSettings", "TeacherData", "teacher_data", "top_k_kl", "attention_parameters", "repair"]


@dataclass(frozen=True)
class RepairSettings:
    """Steps, batches and learning rates of the two phases (equal for every conversion)."""

    layer_steps: int = 40         # per layer
    layer_batch: int = 4          # sequences per step
    layer_lr: float = 1e-3
    logit_steps: int = 20
    logit_batch: int = 2
    logit_lr: float = 3e-4
    top_k: int = 64
    warmup: int = 3
    precision: str = "auto"       # see kqv.train.autocast_dtype

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TeacherData:
    """What the original model says on the repair tokens, computed once for every conversion.

    Attributes:
        layer_inputs: for each layer, the input its attention reads, (N, T, hidden).
        logit_tokens: the sequences of phase 2, (steps, B, T).
        top_logprobs: the log-probabilities of the teacher's k most likely next
            tokens at every position of those sequences, (steps, B, T, k).
        top_ids: which tokens those are, (steps, B, T, k).
    """

    layer_inputs: list[torch.Tensor]
    logit_tokens: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor


@torch.no_grad()
def teacher_data(
    teacher: nn.Module,
    layer_tokens: torch.Tensor,
    logit_tokens: torch.Tensor,
    *,
    top_k: int = 64,
    precision: str = "auto",
    batch_size: int = 4,
) -> TeacherData:
    """Run the original model once over the repair tokens.

    Args:
        teacher: the original :class:`kqv.model.Decoder`.
        layer_tokens: (N, T) sequences for phase 1 (their attention inputs are kept, in float32).
        logit_tokens: (steps, B, T) sequences for phase 2.
        top_k: how many of the teacher's next tokens to keep per position.
        precision: of the phase-2 teacher pass, as the student trains (:func:`kqv.train.autocast_dtype`).
    """
    device = next(teacher.parameters()).device
    inputs: list[list[torch.Tensor]] = [[] for _ in teacher.layers]
    for batch in layer_tokens.split(batch_size):
        h = teacher.embed_tokens(batch.to(device))                              # (b, T, hidden)
        for i, layer in enumerate(teacher.layers):
            inputs[i].append(layer.input_layernorm(h))
            h = layer(h)
    dtype = autocast_dtype(device, precision)
    logprobs, ids = [], []
    for batch in logit_tokens.flatten(0, 1).split(batch_size):
        with autocast(device, dtype):
            logits = teacher(batch.to(device))                                  # (b, T, vocab)
        top = logits.float().log_softmax(-1).topk(top_k, dim=-1)
        logprobs.append(top.values.cpu())
        ids.append(top.indices.to(torch.int32).cpu())
    shape = (*logit_tokens.shape, top_k)
    return TeacherData(
        layer_inputs=[torch.cat(x) for x in inputs],
        logit_tokens=logit_tokens.cpu(),
        top_logprobs=torch.cat(logprobs).view(shape),
        top_ids=torch.cat(ids).view(shape),
    )


def top_k_kl(student_logits: torch.Tensor, top_logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top k tokens and one bucket for the rest, mean per position.

    Args:
        student_logits: (..., vocab).
        top_logprobs: the teacher's top-k log-probabilities, (..., k).
        top_ids: their token ids, (..., k).
    """
    log_q = student_logits.float().log_softmax(-1)                              # (..., vocab)
    q_top = log_q.gather(-1, top_ids.long())                                    # (..., k)
    p_top = top_logprobs.float()

    def rest(logp: torch.Tensor) -> torch.Tensor:                               # log(1 - sum exp(logp))
        return torch.log1p(-logp.logsumexp(-1).exp().clamp(max=1 - 1e-6))

    p_rest, q_rest = rest(p_top), rest(q_top)
    kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    return kl.mean()


def attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of every layer's attention, in order."""
    return [p for layer in model.layers for p in layer.self_attn.parameters()]


def _relative_error(student_attn: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        err = sum(float((student_attn(x) - y).pow(2).sum()) for x, y in zip(X.split(batch), Y.split(batch)))
    return err / float(Y.pow(2).sum())


def _repair_layers(student, teacher, data, settings, seed, folder, progress) -> list[dict]:
    device = next(student.parameters()).device
    dtype = autocast_dtype(device, settings.precision)
    report = []
    for i, (s_layer, t_layer) in enumerate(zip(student.layers, teacher.layers)):
        path = None if folder is None else Path(folder) / f"layer{i:03d}.pt"
        saved = load_checkpoint(path) if path is not None else None
        attn = s_layer.self_attn
        if saved is not None:
            attn.load_state_dict(saved["attention"])
            report.append(saved["report"])
            if progress is not None:
                progress(settings.layer_steps)
            continue
        X = data.layer_inputs[i].to(device)                                     # (N, T, hidden)
        with torch.no_grad():
            Y = torch.cat([t_layer.self_attn(x) for x in X.split(settings.layer_batch)])   # (N, T, hidden)
        scale = float(Y.pow(2).mean())
        before = _relative_error(attn, X, Y, settings.layer_batch)
        start = {k: v.clone() for k, v in attn.state_dict().items()}
        attn.requires_grad_(True)
        optimizer = torch.optim.Adam(attn.parameters(), lr=settings.layer_lr)
        g = _generator(seed, i)
        for step in range(settings.layer_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings.layer_steps, settings.layer_lr, settings.warmup, final=0.0)
            idx = torch.randint(0, X.shape[0], (settings.layer_batch,), generator=g).to(device)
            with autocast(device, dtype):
                out = attn(X[idx])                                              # (b, T, hidden)
            loss = (out.float() - Y[idx]).pow(2).mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(1)
        attn.requires_grad_(False)
        after = _relative_error(attn, X, Y, settings.layer_batch)
        if after > before:
            # A few steps can overshoot a conversion that already fitted well: keep the better weights.
            attn.load_state_dict(start)
            after = before
        entry = {"layer": i, "relative_error_before": before, "relative_error_after": after}
        report.append(entry)
        if path is not None:
            save_checkpoint(path, attention=attn.state_dict(), report=entry)
    return report


def _repair_logits(student, data, settings, path, progress, checkpoint_every: int) -> list[list[float]]:
    device = next(student.parameters()).device
    dtype = autocast_dtype(device, settings.precision)
    params = attention_parameters(student)
    optimizer = torch.optim.Adam(params, lr=settings.logit_lr)
    start, losses = 0, []
    saved = load_checkpoint(path) if path is not None else None
    if saved is not None:
        for layer, state in zip(student.layers, saved["attention"]):
            layer.self_attn.load_state_dict(state)
        optimizer.load_state_dict(saved["optimizer"])
        start, losses = saved["step"], saved["losses"]
        if progress is not None:
            progress(start)
    for p in params:
        p.requires_grad_(True)
    steps = settings.logit_steps
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, settings.logit_lr, settings.warmup, final=0.0)
        tokens = data.logit_tokens[step].to(device)                             # (B, T)
        with autocast(device, dtype):
            logits = student(tokens)                                            # (B, T, vocab)
        loss = top_k_kl(logits, data.top_logprobs[step].to(device), data.top_ids[step].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append([step + 1, loss.item()])
        if progress is not None:
            progress(1)
        done = step + 1
        if path is not None and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(path, attention=[layer.self_attn.state_dict() for layer in student.layers],
                            optimizer=optimizer.state_dict(), step=done, losses=losses)
    for p in params:
        p.requires_grad_(False)
    return losses


def repair(
    student: nn.Module,
    teacher: nn.Module,
    data: TeacherData,
    settings: RepairSettings,
    *,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    checkpoint_every: int = 5,
) -> dict:
    """Repair a converted model in place: phase 1 layer by layer, then phase 2 on the logits.

    The student's cache is untouched (the same modules, the same widths): a
    repaired conversion keeps the bytes per token it had.

    Args:
        student: the converted decoder (its attention may be any kqv kind).
        teacher: the original it was converted from.
        data: :func:`teacher_data` of the teacher on the repair tokens.
        settings: steps, batches, learning rates.
        seed: fixes the order phase 1 draws sequences in.
        checkpoint_dir: where to save progress (each finished layer, then
            phase 2 every ``checkpoint_every`` steps); a second call continues.
        progress: called with the number of steps just done.

    Returns:
        ``{"layers": [per-layer relative errors before and after], "logit_losses":
        [[step, KL], ...], "seconds": time spent in this call}``.
    """
    t0 = time.perf_counter()
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    student.eval()
    layers = _repair_layers(student, teacher, data, settings, seed, folder, progress)
    path = None if folder is None else folder / "logits.pt"
    losses = _repair_logits(student, data, settings, path, progress, checkpoint_every)
    return {"layers": layers, "logit_losses": losses, "seconds": time.perf_counter() - t0}
