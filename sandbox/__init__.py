"""sandboxd: ephemeral sandboxes for autonomous LLM agents, built from kernel primitives."""
__version__ = "0.1.0"
