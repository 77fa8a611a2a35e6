"""A small decoder that takes any member of the attention family.

The shape of Llama (and SmolLM2): token embeddings, then layers of
pre-normalized attention and a SwiGLU MLP, each added to the residual stream,
then a final RMSNorm and the output projection to the vocabulary::

    h = embed(tokens)
    for each layer:
        h = h + attention(RMSNorm(h))      # MHA, GQA, MQA or MLA, by the config
        h = h + mlp(RMSNorm(h))            # down(silu(gate(h)) * up(h))
    logits = lm_head(RMSNorm(h))

:meth:`Decoder.generate` is greedy decoding the way inference servers do it:
one prefill over the prompt fills the caches, then each step feeds only the
newest token (T = 1) and attends over the cache.

Parameter names are Hugging Face Llama's without the ``model.`` prefix
(``embed_tokens``, ``layers.0.self_attn.q_proj``, ``layers.0.mlp.gate_proj``,
``norm``, ``lm_head``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, resolve_positions
from .cache import ModelCache
from .configs import ModelConfig
from .mla import MultiHeadLatentAttention
from .norm import RMSNorm

__all__ = ["MLP", "DecoderLayer", "Decoder", "make_attention"]


def make_attention(config: ModelConfig, *, absorb: bool = False, fused: bool = True) -> nn.Module:
    """The attention module a config describes: ``Attention`` or ``MultiHeadLatentAttention``."""
    if config.is_mla:
        return MultiHeadLatentAttention(
            config.hidden_size, config.num_heads,
            q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
            v_head_dim=config.v_head_dim, rope_theta=config.rope_theta or 10000.0,
            rope_scaling=config.rope_scaling, absorb=absorb, eps=config.rms_norm_eps,
        )
    if config.rope_scaling is not None:
        raise ValueError(
            f"{config.name}: kqv.Attention has plain RoPE only, but the config asks for {config.rope_scaling}"
        )
    return Attention(
        config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
        rope_theta=config.rope_theta, fused=fused,
    )


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, *, absorb: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = make_attention(config, absorb=absorb)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        *,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, cache, angles=angles)  # (B, T, hidden)
        return h + self.mlp(self.post_attention_layernorm(h))                             # (B, T, hidden)


class Decoder(nn.Module):
    """A Llama-style decoder whose attention is whatever ``config`` describes.

    Args:
        config: needs ``vocab_size`` and ``intermediate_size`` besides the attention fields.
        absorb: for MLA configs, attend in latent space.
    """

    def __init__(self, config: ModelConfig, *, absorb: bool = False) -> None:
        super().__init__()
        missing = [f for f in ("vocab_size", "intermediate_size") if getattr(config, f) is None]
        if missing:
            raise ValueError(f"{config.name}: a Decoder needs {missing}; use config.replace(...) to set them")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, absorb=absorb) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> ModelCache:
        """One empty cache per layer (KV or latent, whichever the attention keeps)."""
        return ModelCache(
            [layer.self_attn.new_cache(batch_size, max_len, dtype=dtype, device=device) for layer in self.layers]
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: ModelCache | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab), appending to ``cache`` if given."""
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids of shape (B, T), got {tuple(input_ids.shape)} {input_ids.dtype}")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"the cache has {len(cache)} layers, the model {len(self.layers)}")
        B, T = input_ids.shape
        # Every layer rotates by the same angles: resolve the positions (checked
        # against the cache) and compute RoPE's cosines and sines once, not per layer.
        positions = resolve_positions(positions, B, T, None if cache is None else cache.next_position, input_ids.device)
        if cache is not None:
            cache.begin(B, T)  # a paged cache reserves the new tokens' slots in every layer at once
        angles = self.layers[0].self_attn.rope_angles(positions)             # (T, d/2) each, or None
        h = self.embed_tokens(input_ids)                                     # (B, T, hidden)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, None if cache is None else cache[i], angles=angles)
        return self.lm_head(self.norm(h))                                    # (B, T, vocab)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        prefill_chunk: int | None = None,
        eos_token_id: int | None = None,
        cache: ModelCache | None = None,
    ) -> torch.Tensor:
        """Greedy decoding: the prompt (B, T) and up to ``max_new_tokens`` more, (B, T + N).

        With the cache: one prefill (in chunks of ``prefill_chunk`` tokens if
        given), then one token per step. Without it: the whole sequence is run
        again for every new token, which gives the same tokens, slower.
        Stops early once every sequence has produced ``eos_token_id``.

        ``cache``: decode into this (empty) model cache, such as a paged,
        quantized or sliding-window one (:mod:`kqv.paged`, :mod:`kqv.quant`,
        :mod:`kqv.window`); by default a new dense cache of T + N tokens.

        Runs in ``torch.inference_mode`` (no autograd bookkeeping at all, a
        little faster than ``no_grad``): the tokens it returns are inference
        tensors, to be read, not changed in place or trained on.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be non-negative, got {max_new_tokens}")
        B, T = input_ids.shape
        tokens = input_ids
        if max_new_tokens == 0:
            return tokens
        if cache is not None and not use_cache:
            raise ValueError("a cache was given but use_cache=False")
        if use_cache:
            cache = self.new_cache(B, T + max_new_tokens) if cache is None else cache
            chunk = prefill_chunk or T
            for start in range(0, T, chunk):
                logits = self(input_ids[:, start : start + chunk], cache=cache)
        else:
            logits = self(tokens)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1)                            # (B,)
            if eos_token_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
                done |= next_token == eos_token_id
            tokens = torch.cat((tokens, next_token[:, None]), dim=1)         # (B, T + step + 1)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(next_token[:, None], cache=cache) if use_cache else self(tokens)
        return tokens
