"""The `command` launcher: any OpenAI-compatible server started from a command line.

Macros in the command, env and cwd: ${PORT}, ${HOST}, ${MODEL}, ${PYTHON}, ${CONFIG_DIR};
a relative cwd is relative to config.yml's folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from proxy.backends import LaunchPlan, http_get, served_model_ids
from proxy.config import MACRO, Config, ModelConfig
from proxy.errors import BackendFailed


def plan(model: ModelConfig, config: Config, port: int) -> LaunchPlan:
    settings = model.command
    assert settings is not None, "validated by load_config"
    macros = {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "MODEL": model.name,
        "PYTHON": sys.executable,
        "CONFIG_DIR": str(config.path.parent),
    }

    def expand(text: str) -> str:
        # Only ${NAME} is ours (load_config checked the names); a plain $VAR stays for the program.
        return MACRO.sub(lambda match: macros[match.group(1)], text)

    argv = tuple(expand(arg) for arg in settings.argv)
    health_path = settings.health_path
    expected = settings.model_id

    def probe() -> bool:
        if health_path is None:
            if http_get(port, "/") is None:
                return False
        else:
            answer = http_get(port, health_path)
            if answer is None or answer[0] != 200:
                return False
        if expected is not None:
            listing = http_get(port, "/v1/models")
            served = served_model_ids(listing[1]) if listing and listing[0] == 200 else set()
            if expected not in served:
                raise BackendFailed(f"{model.name}: the server on port {port} serves {sorted(served)}, "
                                    f"not {expected!r}; is another server using that port?")
        return True

    cwd = config.path.parent / Path(expand(settings.cwd)).expanduser() if settings.cwd is not None else None
    return LaunchPlan(
        argv=argv,
        port=port,
        probe=probe,
        env={key: expand(value) for key, value in settings.env.items()},
        cwd=cwd,
        stop_argv=None if settings.stop_argv is None else tuple(expand(arg) for arg in settings.stop_argv),
    )
