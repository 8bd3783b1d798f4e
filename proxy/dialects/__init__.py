"""Dialects: pure translators between what clients speak and the OpenAI shapes backends speak.

One module per client dialect (ollama.py; openai.py, whose translation is only the model's name),
and what they all share in modules of their own: sampler field names per backend (samplers.py),
tool-call assembly (tools.py), and what is read from a backend's answers (backend.py). Standard
library only: no Flask, no requests, no clocks (callers pass the times in). The request path that
carries them to a backend and back is proxy/exchange.py.
"""
