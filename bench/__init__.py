"""The proxy's benchmark harness: `python -m bench` (bench/run.py), with a synthetic SSE upstream
(bench/synthetic.py), a raw-socket measuring client (bench/client.py) and process handling that
leaves no child behind (bench/procs.py)."""
