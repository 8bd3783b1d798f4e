"""The dashboard at /ui: its sessions, live stream, actions, charts and backend log tails.

Observability only: it reads the manager's snapshot and the recent requests, and changes state
only through the manager's public methods (load and unload), as an admin asked.
"""
