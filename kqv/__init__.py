"""kqv: attention from K, Q and V to MHA, MQA, GQA and MLA.

The library behind the book. Each module reads like the chapter that teaches it:

- :mod:`kqv.attention`: scaled dot-product attention and one ``Attention``
  module for MHA, GQA and MQA ("Attention as search" to "Multi-head attention",
  "Multi-query attention", "Grouped-query attention");
- :mod:`kqv.rope`: rotary position embeddings ("Rotary positions");
- :mod:`kqv.cache`: caches that know their own size ("The KV cache");
- :mod:`kqv.mla`: DeepSeek-V2's multi-head latent attention ("Multi-head latent attention");
- :mod:`kqv.configs`: real model configurations and the cache calculator;
- :mod:`kqv.model`: a small decoder with greedy generation through the caches;
- :mod:`kqv.flash`: attention computed fast: online softmax, tiles, split-KV decoding;
- :mod:`kqv.paged`, :mod:`kqv.quant`, :mod:`kqv.window`: serving the cache in
  blocks, quantized, and in a sliding window with attention sinks ("Serving the cache");
  :mod:`kqv.serving_results` measures the last two on the real model.

The rest is imported on first use (``kqv.smollm2`` after ``import kqv`` works,
without loading the GGUF reader or matplotlib before a chapter needs them):
:mod:`kqv.smollm2` (the real model), :mod:`kqv.heads` (its heads),
:mod:`kqv.convert` and :mod:`kqv.evaluate` (conversions, measured),
:mod:`kqv.bench` (timings), :mod:`kqv.plots` (the book's figures),
:mod:`kqv.explore` (explorers that run in the page).

Shape legend, used in every docstring and shape comment:

=======  ==========================================================
B        batch size
T        new tokens in this call (queries)
S        tokens attended to: cached plus new (keys and values)
H        query heads
H_kv     key/value heads; ``q_per_kv = H / H_kv`` query heads share one
D        head width (d_h)
d_c      MLA's latent width (``kv_lora_rank``)
d_r      MLA's RoPE width (``qk_rope_head_dim``)
=======  ==========================================================
"""

import importlib as _importlib

from .attention import Attention, causal_mask, repeat_kv, scaled_dot_product_attention
from .cache import KVCache, LatentCache, ModelCache
from .device import default_device
from .mla import MultiHeadLatentAttention
from .paged import BlockManager, PagedKVCache, PagedLatentCache, PagedModelCache
from .quant import QuantizedKVCache, QuantizedLatentCache
from .window import SlidingWindowKVCache, SlidingWindowLatentCache
from . import configs

__all__ = [
    "Attention",
    "MultiHeadLatentAttention",
    "scaled_dot_product_attention",
    "causal_mask",
    "repeat_kv",
    "KVCache",
    "LatentCache",
    "ModelCache",
    "default_device",
    "configs",
    "BlockManager",
    "PagedKVCache",
    "PagedLatentCache",
    "PagedModelCache",
    "QuantizedKVCache",
    "QuantizedLatentCache",
    "SlidingWindowKVCache",
    "SlidingWindowLatentCache",
]

__version__ = "0.1.0"

# Every public submodule, reachable as an attribute: those above are imported
# already, the others on first access (PEP 562), so ``import kqv`` stays light.
_SUBMODULES = (
    "attention", "bench", "cache", "configs", "convert", "corpus", "device", "diagrams", "evaluate", "experiments", "explore",
    "flash", "heads", "mla", "model", "norm", "paged", "plots", "quant", "rope", "serving_results",
    "smollm2", "train", "uptrain", "window",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)  # also sets kqv.<name>
    raise AttributeError(f"module 'kqv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
