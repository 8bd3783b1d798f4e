"""Memory footprints from a model's files, without loading it: weights, KV cache and an allowance,
for EXL3/EXL2 folders (config.json, *.safetensors) and GGUFs (their metadata). Deciding what fits
is the scheduler's; how TabbyAPI and llama.cpp size their caches is followed here.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.backends.llamacpp import gguf_path
from proxy.config import ModelConfig, deep_merge
from proxy.errors import BackendFailed

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# A TabbyAPI process: its CUDA context (a few hundred MiB per process before any tensor), torch's
# allocator slack, and the working buffers of a forward pass over one chunk of the prompt
# (TabbyAPI's chunk_size, 2048 tokens by default), which do not grow with the cache.
OVERHEAD_BYTES = 512 * MiB
# llama.cpp's compute and output buffers, reserved once for a batch of n_ubatch (512) tokens. The
# demo GGUF (SmolLM2-135M) logs 16.6 MiB of compute and 0.2 MiB of output buffer on CPU; the
# buffers grow with the vocabulary and width of larger models, so this leaves room for 7-8B ones.
GGUF_OVERHEAD_BYTES = 256 * MiB

# exllamav3 allocates its cache in pages of 256 tokens and refuses a size that is not a multiple
# (an assertion in its cache layers); llama.cpp pads its context to 256 cells too (llama-context.cpp).
PAGE_TOKENS = 256
# exllamav3's quantised cache keeps, per 32 values, `bits` 32-bit words and one fp16 scale.
QUANT_GROUP = 32
FP16_BITS = 16
# TabbyAPI's legacy names for cache modes, which it maps to "k,v" bit pairs.
CACHE_MODES = {"FP16": (FP16_BITS, FP16_BITS), "Q8": (8, 8), "Q6": (6, 6), "Q4": (4, 4)}
CACHE_PAIR = re.compile(r"([2-8])\s*,\s*([2-8])")  # the pattern TabbyAPI's config accepts


class EstimateError(Exception):
    """A model's files are missing, unreadable or lack what an estimate needs; the message names the file."""


def estimate_exl(folder: Path, *, cache_tokens: int, cache_mode: str = "FP16") -> int:
    """Return the bytes an EXL3/EXL2 model folder takes loaded: weights, KV cache and OVERHEAD_BYTES.

    The weights are the *.safetensors sizes; the cache holds K and V for `cache_tokens` tokens
    (rounded up to exllamav3's 256-token pages) in every layer, at the bits `cache_mode` gives
    ("FP16", "Q8", "Q6", "Q4" or a "k,v" pair such as "8,6"), with the quantised cache's scales.
    Raises EstimateError naming the file when the folder or its config.json cannot tell.
    """
    return _exl_bytes(folder, cache_tokens, cache_mode) + OVERHEAD_BYTES


def estimate_gguf(path: Path, *, n_ctx: int, n_parallel: int = 1) -> int:
    """Return the bytes a GGUF takes loaded under llama.cpp's server: file, f16 KV cache, buffers.

    The KV cache is sized as llama.cpp sizes it for `n_ctx` total cells shared by `n_parallel`
    slots (see _llamacpp_cells); n_ctx 0 means the model's training context, as in llama.cpp.
    Sliding-window layers are counted at full size and recurrent state is left out, so this is an
    upper bound for the former and low for the latter. The first call for a file reads its
    metadata (seconds for a large vocabulary); later ones are cached until the file changes.
    Raises EstimateError naming the file.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise EstimateError(f"{path}: cannot read the GGUF: {exc.strerror or exc}") from None
    if n_parallel < 1:
        raise EstimateError(f"{path}: n_parallel must be at least 1, got {n_parallel}")
    bytes_per_cell, context_length = _gguf_shape(str(path), stat.st_size, stat.st_mtime_ns)
    if n_ctx < 1:
        if context_length is None:
            raise EstimateError(f"{path}: n_ctx {n_ctx} asks for the training context, and the GGUF has no "
                                "context_length")
        n_ctx = context_length
    cells = _llamacpp_cells(n_ctx, n_parallel)
    return stat.st_size + cells * bytes_per_cell + GGUF_OVERHEAD_BYTES


def estimate(model: ModelConfig, tabby_dir: Path | None) -> int | None:
    """Return the bytes `model` will take once loaded, or None when its files cannot tell.

    tabbyapi: the folder TabbyAPI would load, with the cache TabbyAPI would allocate, plus its
    draft model; llamacpp: the GGUF with its n_ctx and n_parallel; command: None (nothing to read).
    Never raises: a missing or unreadable file gives None and one WARNING per model and reason.
    """
    try:
        if model.backend == "tabbyapi":
            return _estimate_tabby(model, tabby_dir)
        if model.backend == "llamacpp" and model.llamacpp is not None:
            try:
                path = gguf_path(model.name, model.llamacpp)
            except BackendFailed as exc:  # its package is not installed
                raise EstimateError(str(exc).removeprefix(f"{model.name}: ")) from None
            return estimate_gguf(path, n_ctx=model.llamacpp.n_ctx, n_parallel=model.llamacpp.n_parallel)
    except EstimateError as exc:
        _warn_once(model.name, str(exc))
    return None


# ---- EXL3/EXL2 folders ------------------------------------------------------------------------


def _exl_bytes(folder: Path, cache_tokens: int, cache_mode: str) -> int:
    """Return weights plus KV cache of one EXL folder, without the per-process allowance."""
    config = _read_config(folder)
    k_bits, v_bits = _cache_bits(cache_mode, folder)
    if isinstance(cache_tokens, bool) or not isinstance(cache_tokens, int) or cache_tokens < 1:
        raise EstimateError(f"{folder}: the cache size must be a positive number of tokens, got {cache_tokens!r}")
    layers, kv_heads, head_dim = _attention_shape(config, folder / "config.json")
    tokens = _round_up(cache_tokens, PAGE_TOKENS)
    token_dim = kv_heads * head_dim
    cache = layers * tokens * (_cache_row_bytes(token_dim, k_bits) + _cache_row_bytes(token_dim, v_bits))
    return _safetensors_bytes(folder) + cache


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EstimateError(f"{path}: not found; is {folder} an EXL3/EXL2 model folder?") from None
    except OSError as exc:
        raise EstimateError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise EstimateError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise EstimateError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _safetensors_bytes(folder: Path) -> int:
    try:
        files = sorted(folder.glob("*.safetensors"))
        sizes = [file.stat().st_size for file in files]
    except OSError as exc:
        raise EstimateError(f"{folder}: cannot list the weights: {exc.strerror or exc}") from None
    if not files:
        raise EstimateError(f"{folder}: no *.safetensors files (the model's weights) in the folder")
    return sum(sizes)


def _attention_shape(config: Mapping[str, Any], path: Path) -> tuple[int, int, int]:
    """Return (layers, KV heads, head dim) from a Hugging Face config.json."""
    # Multimodal models (Gemma 3, Mistral 3) keep the language model's shape under text_config.
    section = config
    text = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(text, Mapping):
        section, path_key = text, "text_config."
    else:
        path_key = ""

    def number(key: str) -> int | None:
        value = section.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"{path}: {path_key}{key} must be a positive integer, got {value!r}")
        return value

    layers = number("num_hidden_layers")
    if layers is None:
        raise EstimateError(f"{path}: no num_hidden_layers, so the KV cache cannot be sized")
    heads = number("num_attention_heads")
    kv_heads = number("num_key_value_heads") or heads
    head_dim = number("head_dim")
    hidden = number("hidden_size")
    if head_dim is None and hidden is not None and heads is not None:
        head_dim = hidden // heads
    if kv_heads is None or head_dim is None:
        raise EstimateError(f"{path}: needs num_key_value_heads or num_attention_heads, and head_dim or "
                            "hidden_size with num_attention_heads, to size the KV cache")
    return layers, kv_heads, head_dim


def _cache_bits(cache_mode: str, folder: Path) -> tuple[int, int]:
    """Return the (K, V) bits of a TabbyAPI cache mode; FP16_BITS means an unquantised cache."""
    if isinstance(cache_mode, str):
        if cache_mode in CACHE_MODES:
            return CACHE_MODES[cache_mode]
        pair = CACHE_PAIR.fullmatch(cache_mode.strip())
        if pair:
            return int(pair.group(1)), int(pair.group(2))
    raise EstimateError(f"{folder}: unknown cache mode {cache_mode!r}; expected FP16, Q8, Q6, Q4 or "
                        'a "k,v" pair of bits from 2 to 8 such as "8,6"')


def _cache_row_bytes(token_dim: int, bits: int) -> int:
    """Return the bytes one token's K (or V) takes in one layer of exllamav3's cache."""
    if bits == FP16_BITS:
        return token_dim * 2
    # exllamav3's quantised layer (cache/quant.py): token_dim // 32 * bits int32 words, plus
    # token_dim // 32 fp16 scales, for every token.
    groups = token_dim // QUANT_GROUP
    return groups * bits * 4 + groups * 2


# ---- TabbyAPI profiles ------------------------------------------------------------------------


def _estimate_tabby(model: ModelConfig, tabby_dir: Path | None) -> int:
    """Return the bytes of the model (and draft model) TabbyAPI would load for this profile."""
    model_section: Mapping[str, Any] = model.tabby.get("model") or {}
    folder = _tabby_path(model_section.get("model_dir") or "models", tabby_dir, "model.model_dir")
    folder = folder / model.upstream_model
    inline_model, inline_draft = _inline_overrides(folder)
    # TabbyAPI (common/model.py, apply_load_defaults) lets the model folder's tabby_config.yml win
    # over the load's own arguments, for the model and for the draft model alike.
    settings = deep_merge(model_section, inline_model)
    draft = deep_merge(model.tabby.get("draft_model") or {}, inline_draft)

    tokens = _tabby_cache_tokens(settings, folder)
    total = _exl_bytes(folder, tokens, settings.get("cache_mode") or "FP16")
    # TabbyAPI drafts with a separate model only in draft_mode "model" (its default) and only when
    # draft_model_name is set; "mtp" reuses a component of the main model's own weights, and its
    # cache (one layer's worth) is left out here. The draft's cache has the main cache's size.
    draft_name = draft.get("draft_model_name")
    if (draft.get("draft_mode") or "model") == "model" and draft_name:
        draft_dir = _tabby_path(draft.get("draft_model_dir") or "models", tabby_dir, "draft_model.draft_model_dir")
        total += _exl_bytes(draft_dir / str(draft_name), tokens, draft.get("draft_cache_mode") or "FP16")
    return total + OVERHEAD_BYTES


def _tabby_path(value: object, tabby_dir: Path | None, key: str) -> Path:
    """Resolve a TabbyAPI folder setting the way TabbyAPI does: relative to its working directory."""
    path = Path(str(value))
    if path.is_absolute():
        return path
    if tabby_dir is None:
        raise EstimateError(f"{key} {str(value)!r} is relative to TabbyAPI's folder, and proxy.tabby_dir is not set")
    return tabby_dir / path  # the launcher runs TabbyAPI in tabby_dir


def _inline_overrides(folder: Path) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """Return the `model:` and `draft_model:` sections of the folder's tabby_config.yml, if any."""
    path = folder / "tabby_config.yml"
    if not path.is_file():
        return {}, {}
    try:
        inline = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise EstimateError(f"{path}: cannot read TabbyAPI's per-model overrides: {exc}") from None
    if not isinstance(inline, Mapping):
        raise EstimateError(f"{path}: expected a mapping with model: and draft_model: sections")
    sections = inline.get("model") or {}, inline.get("draft_model") or {}
    if not all(isinstance(section, Mapping) for section in sections):
        raise EstimateError(f"{path}: model: and draft_model: must be mappings")
    return sections


def _tabby_cache_tokens(settings: Mapping[str, Any], folder: Path) -> int:
    """Return the cache size in tokens TabbyAPI allocates for these model settings.

    TabbyAPI's exllamav3 container (backends/exllamav3/model.py, "Determine max_seq_len and
    cache_size"): max_seq_len is the configured one, else the model's max_position_embeddings,
    else 8192; a configured -1 is replaced first by max_position_embeddings, else 4096
    (common/model.py, load_model_gen). cache_size is the configured one, else max_seq_len; a
    max_seq_len above the cache is cut down to it, which leaves the cache's size alone.
    """
    cache_size = _setting_int(settings, "cache_size", folder)
    if cache_size:
        return cache_size
    max_seq_len = _setting_int(settings, "max_seq_len", folder)
    if max_seq_len == -1:
        return _max_position_embeddings(folder) or 4096
    if max_seq_len:
        return max_seq_len
    return _max_position_embeddings(folder) or 8192


def _setting_int(settings: Mapping[str, Any], key: str, folder: Path) -> int | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise EstimateError(f"{folder}: model.{key} must be a number of tokens, got {value!r}")
    return value


def _max_position_embeddings(folder: Path) -> int | None:
    # TabbyAPI's HuggingFaceConfig.get_max_position_embeddings: text_config's value first.
    config = _read_config(folder)
    text = config.get("text_config")
    for section in (text if isinstance(text, Mapping) else {}, config):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ---- GGUF files under llama.cpp ---------------------------------------------------------------


def _llamacpp_cells(n_ctx: int, n_parallel: int) -> int:
    """Return the KV cells llama.cpp allocates for a context of n_ctx shared by n_parallel slots.

    Our launcher passes n_ctx as the server's total context and n_parallel as its slots
    (llamacpp_server.py sets CommonParams.n_ctx and .n_parallel), and leaves kv_unified at
    xllamacpp's default, false. llama.cpp's llama_context then pads n_ctx up to a multiple of 256,
    gives each of the n_parallel sequences n_ctx // n_parallel cells padded up to 256 again, and
    allocates that many per sequence: 2048 over 3 slots is 3 x 768 = 2304 cells (its log says so).
    """
    per_slot = _round_up(_round_up(n_ctx, PAGE_TOKENS) // n_parallel, PAGE_TOKENS)
    return per_slot * n_parallel


@functools.lru_cache(maxsize=64)
def _gguf_shape(path: str, size: int, mtime_ns: int) -> tuple[int, int | None]:
    """Return (f16 KV bytes per cell over all layers, training context) from a GGUF's metadata.

    Keyed by size and mtime as well as the path, so a replaced file is read again. GGUFReader
    memory-maps the file and reads no weights, but it decodes every metadata value, the tokenizer's
    vocabulary included, which takes seconds.
    """
    del size, mtime_ns  # cache key only
    from gguf import GGUFReader  # here: numpy and the reader load only when a GGUF is estimated
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise EstimateError(f"{path}: not a readable GGUF file: {exc}") from None

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise EstimateError(f"{path}: no general.architecture in the GGUF metadata")
    layers = value(f"{arch}.block_count")
    if not isinstance(layers, int) or layers < 1:
        raise EstimateError(f"{path}: no {arch}.block_count in the GGUF metadata")
    heads = _per_layer(value(f"{arch}.attention.head_count"), layers, f"{arch}.attention.head_count", path)
    kv_heads = _per_layer(value(f"{arch}.attention.head_count_kv"), layers, f"{arch}.attention.head_count_kv", path)
    kv_heads = kv_heads or heads  # llama.cpp: without head_count_kv every head has its own K and V
    if kv_heads is None:
        raise EstimateError(f"{path}: no {arch}.attention.head_count or head_count_kv in the GGUF metadata")
    embedding = value(f"{arch}.embedding_length")
    key_length, value_length = value(f"{arch}.attention.key_length"), value(f"{arch}.attention.value_length")
    per_cell = 0
    for layer, n_kv in enumerate(kv_heads):
        if n_kv == 0:
            continue  # a layer without attention (recurrent layers of hybrid models)
        # llama.cpp's default head size is embedding_length / head_count, for K and V alike.
        n_head = heads[layer] if heads else 0
        default = embedding // n_head if isinstance(embedding, int) and n_head else None
        k_len = key_length if isinstance(key_length, int) else default
        v_len = value_length if isinstance(value_length, int) else default
        if k_len is None or v_len is None:
            raise EstimateError(f"{path}: needs {arch}.attention.key_length and value_length, or "
                                f"{arch}.embedding_length with head_count, to size the KV cache")
        per_cell += n_kv * (k_len + v_len) * 2  # f16: llama.cpp's default cache type for K and V
    context = value(f"{arch}.context_length")
    return per_cell, context if isinstance(context, int) and context > 0 else None


def _per_layer(raw: Any, layers: int, key: str, path: str) -> list[int] | None:
    """Return a count that may be one number or one per layer as a list of `layers` numbers."""
    if raw is None:
        return None
    counts = raw if isinstance(raw, list) else [raw] * layers
    if len(counts) != layers or not all(isinstance(count, int) and count >= 0 for count in counts):
        raise EstimateError(f"{path}: {key} must be a count or one count per layer ({layers}), got {raw!r}")
    return counts


# ---- helpers ----------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


_warned: set[tuple[str, str]] = set()  # guarded by _warned_lock: (model, reason) pairs already logged
_warned_lock = threading.Lock()


def _warn_once(name: str, reason: str) -> None:
    with _warned_lock:
        if (name, reason) in _warned:
            return
        _warned.add((name, reason))
    log.warning("model %s: memory footprint unknown, the scheduler treats it as such: %s", name, reason)
