"""A quantized KV cache: fewer bytes per number, with the scales that bring them back.

Decoding reads the whole cache at every step, so a cache stored in one byte per
number instead of two (bfloat16) or four (float32) is read two or four times
faster, and holds two or four times more tokens. What it costs is precision;
this module stores and measures it.

Quantizing a group of numbers x with one scale (symmetric, absmax)::

    scale = max |x| / q_max            one float32 per group, stored beside the values
    x_q   = round(x / scale)           in int8 (q_max = 127), or
    x_q   = fp8(x / scale)             in float8_e4m3fn (q_max = 448, its largest finite value)
    x    ~= x_q * scale                what attention reads back

The group is what one scale covers. Keys and values get one scale per token
and per KV head (a group of D numbers): outliers differ from head to head and
token to token, and a per-token scale is known as soon as the token is
written. MLA's latent follows DeepSeek's FlashMLA, whose "FP8 with scale"
cache stores 656 bytes per token: the 512 latent numbers in float8_e4m3fn,
4 float32 scales (one per 128 numbers, 16 bytes) and the 64 RoPE numbers kept
in bfloat16 (128 bytes), "not quantized for accuracy" (FlashMLA's README).

Like :class:`kqv.KVCache`, a quantized cache gives each row of the batch its
own fill level (:meth:`kqv.cache.Cache.select`, :meth:`~kqv.cache.Cache.reset`),
so sequences of different lengths share a batch; each token's scales are its
own, so a row is quantized the same way whatever the others hold.

``bytes_per_token`` counts the scales. Attention reads the values back in the
model's dtype (FlashMLA also computes in bfloat16 after dequantizing); a real
kernel dequantizes on the fly instead of writing the result out, as this
readable version does at every step.

Formats: ``"int8"``, ``"fp8"`` (float8_e4m3fn, where torch has it), and the
plain float formats ``"bfloat16"``, ``"float16"``, ``"float32"``, stored
without scales (the references a quantized cache is measured against).

Book: the "Serving the cache" chapter (Part IV).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .cache import Cache, ModelCache

__all__ = [
    "FORMATS",
    "quantize",
    "dequantize",
    "QuantizedKVCache",
    "QuantizedLatentCache",
    "quantized_cache",
    "cache_quality",
]

_FP8 = getattr(torch, "float8_e4m3fn", None)

#: Cache formats: name -> (stored dtype, the largest magnitude it holds, or
#: None for a float format, stored without scales). "fp8" only where torch has float8_e4m3fn.
FORMATS: dict[str, tuple[torch.dtype, float | None]] = {
    "int8": (torch.int8, 127.0),
    **({"fp8": (_FP8, float(torch.finfo(_FP8).max))} if _FP8 is not None else {}),  # 448
    "bfloat16": (torch.bfloat16, None),
    "float16": (torch.float16, None),
    "float32": (torch.float32, None),
}


def _format(name: str) -> tuple[torch.dtype, float | None]:
    if name not in FORMATS:
        extra = " (this torch has no float8_e4m3fn)" if name == "fp8" else ""
        raise ValueError(f"unsupported cache format {name!r}{extra}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]


def quantize(x: torch.Tensor, format: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values in ``format`` and one float32 scale per ``group_size`` numbers of the last axis.

    Returns ``(values, scales)``: values of the shape of x; scales of shape
    (..., width / group_size), or None for a float format (a plain cast).
    """
    dtype, q_max = _format(format)
    if q_max is None:
        return x.to(dtype), None
    width = x.shape[-1]
    if group_size < 1 or width % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the width ({width})")
    groups = x.float().unflatten(-1, (width // group_size, group_size))   # (..., groups, group_size)
    amax = groups.abs().amax(-1)                                         # (..., groups)
    scale = torch.where(amax > 0, amax / q_max, torch.ones_like(amax))  # an all-zero group keeps scale 1
    scaled = (groups / scale.unsqueeze(-1)).clamp(-q_max, q_max)
    if dtype == torch.int8:
        scaled = scaled.round()
    return scaled.to(dtype).flatten(-2), scale


def dequantize(values: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The numbers back, in ``dtype``: values times their group's scale."""
    if scales is None:
        return values.to(dtype)
    groups = values.float().unflatten(-1, (scales.shape[-1], -1))       # (..., groups, group_size)
    return (groups * scales.unsqueeze(-1)).flatten(-2).to(dtype)


def _stored(format: str, dtype: torch.dtype | None, device) -> tuple[torch.dtype, torch.dtype]:
    """The stored dtype of ``format`` and the dtype attention reads back; checks both."""
    stored, _ = _format(format)
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"a cache hands out floating-point numbers, got dtype {dtype}")
    try:
        torch.zeros(1, dtype=stored, device=device)
    except (RuntimeError, TypeError) as exc:
        raise TypeError(f"format {format!r} ({stored}) is not supported on device {device}: {exc}") from exc
    return stored, dtype


class QuantizedKVCache(Cache):
    """Keys and values for :class:`kqv.Attention`, quantized: (B, H_kv, S_max, D) values and their scales.

    Args:
        batch_size, num_kv_heads, max_len, head_dim: as :class:`~kqv.cache.KVCache`.
        format: ``"int8"``, ``"fp8"``, or a float format (see :data:`FORMATS`).
        group_size: numbers per scale along D; default D, one scale per token and KV head.
        dtype: what :meth:`update` returns and takes (the model's dtype).
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        format: str = "int8",
        group_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        stored, dtype = _stored(format, dtype, device)
        group_size = group_size or head_dim
        if head_dim % group_size:
            raise ValueError(f"group_size ({group_size}) must divide head_dim ({head_dim})")
        shape = (batch_size, num_kv_heads, None, head_dim)
        shapes = {"k": shape, "v": shape}
        dtypes = {"k": stored, "v": stored}
        if FORMATS[format][1] is not None:
            scales = (batch_size, num_kv_heads, None, head_dim // group_size)
            shapes |= {"k_scale": scales, "v_scale": scales}
            dtypes |= {"k_scale": torch.float32, "v_scale": torch.float32}
        super().__init__(shapes, max_len=max_len, dtype=dtype, device=device, dtypes=dtypes)
        self.format, self.group_size, self._dtype = format, group_size, dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention reads back (the stored one is ``format``)."""
        return self._dtype

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and append k, v (B, H_kv, T, D); return all keys and values read back, (B, H_kv, S, D)."""
        if k.dtype != self._dtype or v.dtype != self._dtype:
            raise TypeError(f"k and v have dtypes {k.dtype}, {v.dtype}; the cache takes {self._dtype}")
        (k_q, k_s), (v_q, v_s) = quantize(k, self.format, self.group_size), quantize(v, self.format, self.group_size)
        if k_s is None:
            k_all, v_all = self.append(k=k_q, v=v_q)
            return k_all.to(self._dtype), v_all.to(self._dtype)
        k_all, v_all, k_sc, v_sc = self.append(k=k_q, v=v_q, k_scale=k_s, v_scale=v_s)
        return dequantize(k_all, k_sc, self._dtype), dequantize(v_all, v_sc, self._dtype)


class QuantizedLatentCache(Cache):
    """MLA's latent rows, quantized as FlashMLA stores them: c_kv quantized, k_rope kept in bfloat16.

    At DeepSeek's widths (d_c = 512, d_r = 64) in fp8 with the default group
    of 128, a token takes 512 + 4 * 4 + 64 * 2 = 656 bytes.

    Args:
        batch_size, kv_lora_rank, qk_rope_head_dim, max_len: as :class:`~kqv.cache.LatentCache`.
        format: of the latent c_kv (``"fp8"`` by default, as FlashMLA).
        group_size: latent numbers per scale; default 128 where it divides d_c, else d_c.
        rope_dtype: of the RoPE part, stored unquantized (bfloat16).
        dtype: what :meth:`update` returns and takes (the model's dtype).
    """

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        max_len: int,
        *,
        format: str = "fp8",
        group_size: int | None = None,
        rope_dtype: torch.dtype = torch.bfloat16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        stored, dtype = _stored(format, dtype, device)
        if group_size is None:
            group_size = 128 if kv_lora_rank % 128 == 0 else kv_lora_rank
        if kv_lora_rank % group_size:
            raise ValueError(f"group_size ({group_size}) must divide kv_lora_rank ({kv_lora_rank})")
        shapes = {"c_kv": (batch_size, None, kv_lora_rank), "k_rope": (batch_size, None, qk_rope_head_dim)}
        dtypes = {"c_kv": stored, "k_rope": rope_dtype}
        if FORMATS[format][1] is not None:
            shapes["c_kv_scale"] = (batch_size, None, kv_lora_rank // group_size)
            dtypes["c_kv_scale"] = torch.float32
        super().__init__(shapes, max_len=max_len, dtype=dtype, device=device, dtypes=dtypes)
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        self.format, self.group_size, self.rope_dtype, self._dtype = format, group_size, rope_dtype, dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention reads back (the stored ones are ``format`` and ``rope_dtype``)."""
        return self._dtype

    def update(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Quantize and append c_kv (B, T, d_c), store k_rope (B, T, d_r); return every row read back, (B, S, d_c + d_r)."""
        if c_kv.shape[-1] != self.kv_lora_rank or k_rope.shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"expected widths d_c={self.kv_lora_rank} and d_r={self.qk_rope_head_dim}, "
                f"got c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)}"
            )
        if c_kv.dtype != self._dtype or k_rope.dtype != self._dtype:
            raise TypeError(f"c_kv and k_rope have dtypes {c_kv.dtype}, {k_rope.dtype}; the cache takes {self._dtype}")
        c_q, c_s = quantize(c_kv, self.format, self.group_size)
        new = {"c_kv": c_q, "k_rope": k_rope.to(self.rope_dtype)}
        if c_s is not None:
            new["c_kv_scale"] = c_s
        held = dict(zip(new, self.append(**new)))
        c_all = dequantize(held["c_kv"], held.get("c_kv_scale"), self._dtype)          # (B, S, d_c)
        return torch.cat((c_all, held["k_rope"].to(self._dtype)), dim=-1)             # (B, S, d_c + d_r)


def quantized_cache(
    module: torch.nn.Module,
    batch_size: int,
    max_len: int,
    *,
    format: str = "int8",
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """The quantized cache that an attention module or a whole decoder needs, on its device and dtype.

    ``module``: a :class:`kqv.Attention` (gives a :class:`QuantizedKVCache`), a
    :class:`kqv.MultiHeadLatentAttention` (a :class:`QuantizedLatentCache`), or
    a :class:`kqv.model.Decoder` (a :class:`~kqv.cache.ModelCache` of either).
    """
    from .attention import Attention
    from .mla import MultiHeadLatentAttention

    kw = dict(format=format, group_size=group_size)
    if hasattr(module, "layers"):
        return ModelCache(
            [quantized_cache(l.self_attn, batch_size, max_len, dtype=dtype, device=device, **kw) for l in module.layers]
        )
    if isinstance(module, MultiHeadLatentAttention):
        w = module.kv_b_proj.weight
        return QuantizedLatentCache(
            batch_size, module.kv_lora_rank, module.qk_rope_head_dim, max_len,
            dtype=dtype or w.dtype, device=device or w.device, **kw,
        )
    if isinstance(module, Attention):
        w = module.k_proj.weight
        return QuantizedKVCache(
            batch_size, module.num_kv_heads, max_len, module.head_dim,
            dtype=dtype or w.dtype, device=device or w.device, **kw,
        )
    raise TypeError(f"no quantized cache for a {type(module).__name__}")


@torch.no_grad()
def cache_quality(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    formats: Sequence[str] = ("float32", "bfloat16", "fp8", "int8"),
    *,
    chunk: int | None = None,
    references: Sequence[str] = ("float32", "bfloat16"),
) -> list[dict]:
    """Perplexity and next-token agreement of a model whose cache is stored in each format.

    The text goes through the model in chunks of ``chunk`` tokens (default:
    all at once), every chunk's keys and values going into the cache and being
    read back from it, so that every attention score uses stored keys and
    values. The model's weights and activations stay in its own dtype: only
    the cache changes.

    Args:
        model: a :class:`kqv.model.Decoder` (such as :func:`kqv.smollm2.load_smollm2`'s).
        input_ids: token ids (1, T) or (T,).
        formats: cache formats to compare (:data:`FORMATS`).
        references: formats whose greedy next tokens the others are compared with
            (each is added to ``formats`` if missing).

    Returns:
        One dict per format: ``format``, ``bytes_per_token`` (the whole model's
        cache, scales included), ``perplexity``, and for each reference r
        ``agreement_<r>``: the fraction of positions whose most likely next
        token is the one predicted with the r cache.
    """
    from .evaluate import one_text

    input_ids = one_text(model, input_ids)
    T = input_ids.shape[1]
    chunk = chunk or T
    predictions, rows = {}, []
    for fmt in [*formats, *(r for r in references if r not in formats)]:
        cache = quantized_cache(model, 1, T, format=fmt)
        logits = torch.cat([model(input_ids[:, s : s + chunk], cache=cache) for s in range(0, T, chunk)], dim=1)
        nll = F.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:])
        predictions[fmt] = logits[0].argmax(-1)                              # (T,)
        rows.append({"format": fmt, "bytes_per_token": cache.bytes_per_token, "perplexity": float(nll.exp())})
    for row in rows:
        for ref in references:
            row[f"agreement_{ref}"] = float((predictions[row["format"]] == predictions[ref]).float().mean())
    return [row for row in rows if row["format"] in formats]
