"""HTTP routes, one blueprint per dialect: OpenAI (/v1), admin (/health, /status, /unload)."""
