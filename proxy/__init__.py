"""A model-swapping proxy for local LLM servers: starts backends on demand, swaps, streams, unloads."""

__version__ = "0.1.0"
