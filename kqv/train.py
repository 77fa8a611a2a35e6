"""Training small decoders: data, tokenizer, designs of equal size, and a loop that can be stopped.

What a design COSTS in quality is best measured by training each design from
scratch on the same tokens with the same budget (the chapter on costs does it;
``python -m kqv.experiments scratch`` runs it). This module has the pieces:

- :func:`train_bpe`: a small byte-level BPE vocabulary learned from the
  training split of :mod:`kqv.corpus`. SmolLM2's 49,152 tokens would make
  the embedding table most of a model this small (49,152 x 128 numbers against
  about 0.8M in its layers), so the model would spend its budget on rare words;
  2,048 tokens keep the layers, where attention lives, the larger part.
- :func:`design_configs`: MHA, GQA, MQA and MLA versions of one base config with
  **equal parameter counts**: a design whose attention has fewer parameters (MQA
  keeps one K and V projection instead of H) gets them back in a wider MLP.
  With equal parameters and equal tokens, the training compute is equal too
  (up to the attention scores themselves, which differ by a few percent).
- :func:`train_lm`: AdamW with warm-up and cosine decay, next-token
  cross-entropy, batches drawn at random positions of the token stream. Each
  step's batch depends only on (seed, step), and the state is checkpointed
  atomically, so a run that is stopped and started again continues where it
  was and gives the same numbers as one that never stopped.

Determinism: on a CPU, the same seed and the same number of threads give the
same numbers (tested). On a GPU, fused kernels may reorder sums.

Book: chapter 12, "What each catalog costs".
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ModelConfig

__all__ = [
    "autocast_dtype",
    "autocast",
    "lr_at",
    "sample_batch",
    "save_checkpoint",
    "load_checkpoint",
    "train_bpe",
    "init_weights",
    "count_parameters",
    "design_configs",
    "TrainSettings",
    "train_lm",
]


# --- Precision -------------------------------------------------------------------


def _cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast training to, or None for plain float32.

    ``precision``: "fp32", "bf16", or "auto": bfloat16 on a CUDA device that
    supports it and on a CPU with bfloat16 units (measured here: a 2048 x 576 x
    1536 matmul at 416 GFLOP/s against 87 in float32, two threads, AMX), float32
    elsewhere (a CPU without them emulates bfloat16, slower than float32).
    Master weights, optimizer state and losses stay float32 either way.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_bf16() else None
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on the device's type, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# --- The schedule and the data ------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: int, final: float = 0.1) -> float:
    """Learning rate of a step: linear warm-up over ``warmup`` steps, then cosine down to ``final * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a few integers (a seed, a step, a layer)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Token windows (batch_size, seq_len + 1) at random places of a 1-D stream, fixed by (seed, step).

    The extra token is the last target: inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``.
    """
    if tokens.dim() != 1 or tokens.numel() < seq_len + 2:
        raise ValueError(f"need a 1-D stream longer than seq_len + 1 = {seq_len + 1}, got {tuple(tokens.shape)}")
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=_generator(seed, step))
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])    # (B, seq_len + 1)


# --- Checkpoints -------------------------------------------------------------------


def save_checkpoint(path: str | Path, **state) -> None:
    """``torch.save`` to a temporary file, then rename: a killed run never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict | None:
    """What :func:`save_checkpoint` wrote, on the CPU, or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# --- A vocabulary of its own ---------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer learned from ``texts`` (deterministic: same texts, same merges).

    Byte-level like GPT-2 and SmolLM2: every byte is a token to start with, so
    no text is ever out of vocabulary; ``vocab_size - 256`` merges are then
    learned, most frequent pair first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 256:
        raise ValueError(f"a byte-level vocabulary needs more than 256 tokens, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# --- Models of equal size --------------------------------------------------------------


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation: every linear and embedding weight from N(0, std^2), norms at 1.

    PyTorch's defaults would give a tied embedding (and so the output layer)
    weights of size 1, and logits far too large to start from.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _parameters(config: ModelConfig) -> int:
    """Parameters of a :class:`kqv.model.Decoder` with this config, counted without building it."""
    from .model import Decoder

    with torch.device("meta"):
        return count_parameters(Decoder(config))


def design_configs(base: ModelConfig, designs: dict[str, dict]) -> dict[str, ModelConfig]:
    """Versions of ``base`` with other attention, each with the parameter count of the first.

    Args:
        base: a decoder config (vocab_size and intermediate_size set).
        designs: name -> the attention fields to change, e.g.
            ``{"MHA": {}, "MQA": {"num_kv_heads": 1}}``. The first is the
            reference; each other design's ``intermediate_size`` is set so that
            its count is as close to the reference's as a whole number allows.

    Returns:
        name -> config (its ``name`` is the design's name).
    """
    if not designs:
        raise ValueError("design_configs needs at least one design")
    out: dict[str, ModelConfig] = {}
    target = None
    for name, changes in designs.items():
        config = base.replace(name=name, **changes)
        if target is None:
            target = _parameters(config)
        else:
            # Each unit of intermediate_size is 3 * hidden numbers per layer (gate, up, down).
            per_unit = 3 * config.hidden_size * config.num_layers
            width = config.intermediate_size + round((target - _parameters(config)) / per_unit)
            if width < 1:
                raise ValueError(f"{name}: no MLP width gives {target:,} parameters")
            config = config.replace(intermediate_size=width)
        out[name] = config
    return out


# --- The loop ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """How long and how fast to train (:func:`train_lm`)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float = 3e-3
    warmup: int = 10
    final_lr: float = 0.1        # the cosine ends at final_lr * lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"      # see autocast_dtype
    log_every: int = 10          # record the mean training loss every this many steps
    checkpoint_every: int = 25

    def as_dict(self) -> dict:
        return asdict(self)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on norms' gains (as GPT-2 and Llama train)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def train_lm(
    model: nn.Module,
    tokens: torch.Tensor,
    settings: TrainSettings,
    *,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``model`` on next-token prediction over a 1-D token stream; resume from ``checkpoint``.

    Args:
        model: a :class:`kqv.model.Decoder`, on the device to train on, in float32.
        tokens: the training stream (N,).
        settings: steps, batch, learning rate, precision.
        seed: fixes the batches (:func:`sample_batch` with this seed).
        checkpoint: a file to save the state to every ``checkpoint_every``
            steps and at the end; if it exists, training continues from it.
        progress: called after each step with (step, loss), e.g. a progress bar's update.

    Returns:
        ``{"losses": [[step, mean loss over the last log_every steps], ...],
        "seconds": time spent training in this call, "tokens": tokens trained on}``.
    """
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, settings.precision)
    optimizer = torch.optim.AdamW(
        _decay_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95), eps=1e-8
    )
    start, losses, window = 0, [], []
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses, window = state["step"], state["losses"], state["window"]
    model.train()
    t0 = time.perf_counter()
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.lr, settings.warmup, settings.final_lr)
        batch = sample_batch(tokens, settings.batch_size, settings.seq_len, seed, step).to(device)
        with autocast(device, dtype):
            logits = model(batch[:, :-1])                                     # (B, T, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        value = loss.item()
        window.append(value)
        if len(window) == settings.log_every or step == settings.steps - 1:
            losses.append([step + 1, sum(window) / len(window)])
            window = []
        if progress is not None:
            progress(step + 1, value)
        done = step + 1
        if checkpoint is not None and (done % settings.checkpoint_every == 0 or done == settings.steps):
            save_checkpoint(checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            step=done, losses=losses, window=window)
    model.eval()
    return {
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "tokens": settings.steps * settings.batch_size * settings.seq_len,
    }
