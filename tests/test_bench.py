"""The benchmark harness runs end to end (`python -m bench --quick`) and shows no gross regression.

Timing targets are the benchmark's business, not this test's: on a shared two-core machine exact
figures vary from run to run, so this fails only on failures no noise explains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(150)
def test_quick_benchmark_runs_and_shows_no_gross_regression(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, f"python -m bench --quick failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert results["errors"] == [], results["errors"]
    metrics = results["metrics"]

    # The relay must keep up with a stream paced at 20,000 chunks/s (far above any model) and spend
    # little CPU per chunk. The unpaced P2 ratio is not gated: it is CPU-bound on two cores shared by
    # client, proxy and backend (0.2-0.5 here) and swings with whatever else runs on the machine.
    assert metrics["P2b"]["ratio"] >= 0.5, metrics["P2b"]
    assert metrics["P7.cpu"]["value"] <= 100.0, metrics["P7.cpu"]  # proxy CPU µs per relayed chunk (~10)
    assert metrics["P5"]["details"]["errors"]["proxy"] == 0, metrics["P5"]["details"]
    assert metrics["P1"]["value"] <= 50.0, metrics["P1"]           # added ms at p50
    assert metrics["P1.cpu"]["value"] <= 50.0, metrics["P1.cpu"]   # proxy CPU ms per small request (~1-5)
    assert metrics["P7"]["value"] <= 300.0, metrics["P7"]          # idle RSS in MB

    # Connection reuse is a count, not a timing: one client connection carries every streamed answer
    # in both dialects, and the proxy's streams reuse pooled backend connections (a proxy that
    # opened one per stream would show one per request).
    assert metrics["CONN"]["details"]["failed_requests"] == 0, metrics["CONN"]
    assert metrics["CONN"]["value"] == 1, metrics["CONN"]
    assert metrics["CONN.backend"]["value"] <= 2, metrics["CONN.backend"]
    # A swap adds tens of ms to the backend's own start; one that waited out stop_grace (5 s) would not pass.
    assert metrics["SWAP"]["value"] <= 2000.0, metrics["SWAP"]     # added ms at p50
