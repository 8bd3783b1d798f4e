"""Admin routes: /health (alive), /status (every model's state, and the peers'), /unload (admin key).

State changes only through the manager's methods; a peer's model is unloaded by that peer.
"""

from __future__ import annotations

import math
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

import proxy
from proxy.app_context import ProxyContext
from proxy.errors import BadRequest, ProxyError, Unsupported, render_openai_error
from proxy.manager import ModelStatus
from proxy.memory import RAM, gpu, gpu_index
from proxy.nvml import Device
from proxy.peers import is_peer_model
from proxy.pipeline import resolve_model

bp = Blueprint("admin", __name__)


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    return render_openai_error(error)


@bp.get("/health")
def health() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/ping")
def ping() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/status")
def status() -> Response:
    context = ProxyContext.current()
    caller = context.authorize()  # pids, ports and backend errors are not for anonymous callers
    admin = caller is None or caller.admin  # None: auth is off, and so is every admin check
    return jsonify(status_body(context, admin=admin))


def status_body(context: ProxyContext, *, admin: bool) -> dict[str, Any]:
    """Return /status's answer (also the dashboard's live events); backend output only for admins."""
    snapshot = context.manager.snapshot()
    return {
        "version": proxy.__version__,
        "uptime_s": round(time.time() - context.started_at, 3),
        "max_loaded_models": context.config.proxy.max_loaded_models,
        "models": [status_record(entry, admin=admin) for entry in snapshot],
        "memory": memory_record(context.manager.budgets(), snapshot, context.manager.memory.devices()),
        "peers": context.peers.status(),
    }


def memory_record(budgets: dict[str, int], snapshot: list[ModelStatus], seen: list[Device]) -> list[dict[str, Any]]:
    """Return /status's `memory`: per device its budget, what each loaded model takes, and what NVML sees."""
    nvml = {gpu(device.index): device for device in seen}
    records = []
    for name in sorted(budgets.keys() | nvml.keys(), key=lambda device: (device == RAM, gpu_index(device) or 0)):
        used = {entry.name: entry.holds[name] for entry in snapshot if entry.holds.get(name)}
        device = nvml.get(name)
        records.append({
            "device": name,
            "budget": budgets.get(name),
            "used": used,
            "available": None if name not in budgets else max(0, budgets[name] - sum(used.values())),
            "nvml": None if device is None else {"name": device.name, "total": device.total, "free": device.free,
                                                 "used": device.used},
        })
    return records


def status_record(entry: ModelStatus, *, admin: bool = False) -> dict[str, Any]:
    """Return a model's /status entry; the backend's output (paths, argv, tracebacks) only for admins."""
    return {
        "name": entry.name,
        "backend": entry.backend,
        "state": entry.state,
        "pid": entry.pid,
        "port": entry.port,
        "url": entry.url,
        "peer": entry.peer,
        "leases": entry.leases,
        "queued": entry.queued,
        "keep_alive_s": None if math.isinf(entry.keep_alive_s) else entry.keep_alive_s,
        "unloads": "never" if math.isinf(entry.keep_alive_s) else "after idle",
        "expires_at": entry.expires_at.isoformat() if entry.expires_at else None,
        "ready_since": entry.ready_since.isoformat() if entry.ready_since else None,
        "requests_served": entry.requests_served,
        "progress": entry.progress,
        "pinned": entry.pinned,
        "footprint": {"vram": entry.need.vram, "ram": entry.need.ram, "gpus": entry.need.gpus,
                      "source": entry.need.source},
        "memory": dict(entry.holds),
        "last_error": entry.last_error,
        "last_output": entry.last_output if admin else None,
    }


@bp.route("/unload", methods=["GET", "POST"])
def unload() -> Response:
    context = ProxyContext.current()
    context.authorize(admin=True)
    # The raw bytes whatever the Content-Type: `request.data` is empty for a form type (curl -d
    # sends one), which read as "no body", so the unload hit every model and ignored force.
    sent = request.get_data(cache=True).strip() if request.method == "POST" else b""
    body = request.get_json(force=True, silent=True) if sent else {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object like {\"model\": \"name\", \"force\": false}; "
                         "nothing was unloaded")
    requested = request.args.get("model", body.get("model"))
    force = _flag(request.args.get("force", body.get("force", False)))
    model = None if requested in (None, "") else resolve_model(context.config, requested)
    if model is not None and is_peer_model(model):  # the peer's own scheduler unloads it, there
        answer = context.peers.forward(model, "/unload", {"model": model.upstream_model, "force": force})
        context.manager.unload(model.name, force=force)  # this proxy's record of it: nothing runs here
        unloaded = answer.get("unloaded") if isinstance(answer, dict) else None
        return jsonify({"unloaded": unloaded if isinstance(unloaded, list) else []})
    stopped = context.manager.unload(None if model is None else model.name, force=force)
    return jsonify({"unloaded": stopped})


@bp.post("/reload")
def reload() -> Response:
    """Read config.yml, the profiles and api_tokens.yml again (as SIGHUP does) and say whether it worked."""
    context = ProxyContext.current()
    context.authorize(admin=True)
    if context.reload is None:
        raise Unsupported("live reload is not running in this process")
    if not context.reload():
        raise BadRequest("the new configuration is invalid; the running one is kept (see the proxy's log)")
    return jsonify({"reloaded": True, "models": list(context.config.models)})


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no", ""):
        return value.lower() in ("1", "true", "yes")
    raise BadRequest(f"force: expected true or false, got {value!r}", param="force")
