"""The model catalog Ollama clients see (/api/tags, /api/show, /api/ps), built once per config.

Values come from the profile's optional `details`, `capabilities` and `context_length`, or are
derived from the model's files and backend settings; nothing is invented per request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy.config import Config, ModelConfig
from proxy.dialects.ollama_records import rfc3339_local

FORMATS = {"llamacpp": "gguf", "tabbyapi": "exl3", "command": "", "remote": ""}


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    model: ModelConfig
    digest: str
    size: int
    size_vram: int
    modified_at: str
    details: dict[str, Any]
    capabilities: tuple[str, ...]
    context_length: int | None

    def tag(self, name: str) -> dict[str, Any]:
        """Return the /api/tags object for one of this model's names."""
        return {"name": name, "model": name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details, "capabilities": list(self.capabilities)}


class Catalog:
    """Catalog entries for one Config; build_catalog() reads the files once."""

    def __init__(self, config: Config, entries: dict[str, CatalogEntry]) -> None:
        self.config = config
        self.entries = entries


_cache: Catalog | None = None


def catalog_for(config: Config) -> Catalog:
    """Return the catalog of this config, built on first use (a reload brings a new config)."""
    global _cache
    cached = _cache
    if cached is None or cached.config is not config:
        cached = Catalog(config, {name: build_entry(model, config) for name, model in config.models.items()})
        _cache = cached
    return cached


def build_entry(model: ModelConfig, config: Config) -> CatalogEntry:
    details = model.details
    files = model_files(model, config)
    size = details.size if details.size is not None else sum(_size(path) for path in files)
    on_gpu = model.backend != "llamacpp" or bool(model.llamacpp and model.llamacpp.n_gpu_layers)
    size_vram = details.size_vram if details.size_vram is not None else (size if on_gpu else 0)
    mtimes = [_mtime(path) for path in (model.source, *files)]
    digest = hashlib.sha256(model.name.encode() + b"\0" + _profile_bytes(model)).hexdigest()
    family = details.family
    return CatalogEntry(
        model=model,
        digest=digest,
        size=size,
        size_vram=size_vram,
        modified_at=rfc3339_local(datetime.fromtimestamp(max(mtimes)).astimezone()),
        details={"parent_model": "", "format": details.format or FORMATS[model.backend], "family": family,
                 "families": list(details.families) or ([family] if family else []),
                 "parameter_size": details.parameter_size, "quantization_level": details.quantization_level},
        capabilities=model.capabilities if model.capabilities is not None else default_capabilities(model),
        context_length=context_length(model),
    )


def default_capabilities(model: ModelConfig) -> tuple[str, ...]:
    if model.llamacpp is not None and model.llamacpp.embedding:
        return ("completion", "embedding")
    if model.backend == "tabbyapi" and model.tabby.get("model", {}).get("vision"):
        return ("completion", "vision")
    return ("completion",)


def context_length(model: ModelConfig) -> int | None:
    """Return the context the backend loads: the profile's, llama.cpp's n_ctx or TabbyAPI's max_seq_len."""
    if model.context_length is not None:
        return model.context_length
    if model.llamacpp is not None:
        return model.llamacpp.n_ctx
    max_seq_len = model.tabby.get("model", {}).get("max_seq_len") if model.backend == "tabbyapi" else None
    return max_seq_len if isinstance(max_seq_len, int) and max_seq_len > 0 else None


def model_files(model: ModelConfig, config: Config) -> list[Path]:
    """Return the files that hold the weights, when the proxy can know them."""
    settings = model.llamacpp
    if settings is not None:
        if settings.model_path is not None:
            return [settings.model_path]
        from proxy.backends.llamacpp import gguf_path
        from proxy.errors import BackendFailed
        try:
            return [gguf_path(model.name, settings)]
        except BackendFailed:
            return []
    if model.backend == "tabbyapi" and config.proxy.tabby_dir is not None:
        model_dir = Path(str(model.tabby.get("model", {}).get("model_dir") or "models"))
        folder = config.proxy.tabby_dir / model_dir / model.upstream_model
        return [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    return []


def _profile_bytes(model: ModelConfig) -> bytes:
    """Return what the digest is made of: the profile file, or for a peer's model (whose source is config.yml,
    where the peer is named) the peer and its id."""
    if model.remote is not None and model.remote.peer is not None:
        return f"{model.remote.peer}\0{model.upstream_model}".encode()
    try:
        return model.source.read_bytes()
    except OSError:  # removed since it was read; the next reload drops it
        return b""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
