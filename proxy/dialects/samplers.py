"""Sampler field names per backend: the same setting is called differently by TabbyAPI and llama.cpp.

Every dialect that maps sampling options (Ollama's `options` today) reads the backend's names here.
"""

from __future__ import annotations

from typing import Literal

SamplerNames = Literal["tabbyapi", "llamacpp"]
"""Which sampler field names the backend understands: TabbyAPI's, or llama.cpp's (also used for
other OpenAI-compatible servers, which ignore what they do not know)."""

# Ollama option -> backend field, per backend. Options that are not listed are ignored, as Ollama
# ignores unknown ones; runner-level options (num_gpu, num_thread, ...) have no request equivalent.
SAMPLERS: dict[str, dict[SamplerNames, str | None]] = {
    "temperature": {"tabbyapi": "temperature", "llamacpp": "temperature"},
    "top_k": {"tabbyapi": "top_k", "llamacpp": "top_k"},
    "top_p": {"tabbyapi": "top_p", "llamacpp": "top_p"},
    "min_p": {"tabbyapi": "min_p", "llamacpp": "min_p"},
    "typical_p": {"tabbyapi": "typical", "llamacpp": "typical_p"},
    "repeat_penalty": {"tabbyapi": "repetition_penalty", "llamacpp": "repeat_penalty"},
    "repeat_last_n": {"tabbyapi": "penalty_range", "llamacpp": "repeat_last_n"},
    "presence_penalty": {"tabbyapi": "presence_penalty", "llamacpp": "presence_penalty"},
    "frequency_penalty": {"tabbyapi": "frequency_penalty", "llamacpp": "frequency_penalty"},
    "seed": {"tabbyapi": None, "llamacpp": "seed"},  # TabbyAPI has no seed
    "num_keep": {"tabbyapi": None, "llamacpp": "n_keep"},
    "mirostat": {"tabbyapi": "mirostat_mode", "llamacpp": "mirostat"},
    "mirostat_tau": {"tabbyapi": "mirostat_tau", "llamacpp": "mirostat_tau"},
    "mirostat_eta": {"tabbyapi": "mirostat_eta", "llamacpp": "mirostat_eta"},
    "tfs_z": {"tabbyapi": "tfs", "llamacpp": None},
}


def sampler_names(backend: str) -> SamplerNames:
    """Return whose sampler names a backend kind understands."""
    return "tabbyapi" if backend == "tabbyapi" else "llamacpp"
