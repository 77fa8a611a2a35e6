"""kqv: attention from K, Q and V to MHA, MQA, GQA and MLA.

The library behind the book. Each module reads like the chapter that teaches it:

- :mod:`kqv.attention`: scaled dot-product attention and one ``Attention``
  module for MHA, GQA and MQA (chapters 1 to 3, 5 and 6);
- :mod:`kqv.rope`: rotary position embeddings;
- :mod:`kqv.cache`: caches that know their own size (chapter 4);
- :mod:`kqv.mla`: DeepSeek-V2's multi-head latent attention (chapter 7);
- :mod:`kqv.configs`: real model configurations and the cache calculator;
- :mod:`kqv.model`: a small decoder with greedy generation through the caches;
- :mod:`kqv.paged`, :mod:`kqv.quant`, :mod:`kqv.window`: serving the cache in
  blocks, quantized, and in a sliding window with attention sinks.

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
