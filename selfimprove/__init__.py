"""selfimprove: a command-line experiment runner for LLM self-improvement research."""

__version__ = "0.1.0"
