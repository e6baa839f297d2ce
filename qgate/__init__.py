"""qgate: score and select instruction-tuning data with a quality-gated language model.

The library is importable without Ray; the Ray entrypoints live in `ray_jobs/` and `serve/`.
"""

__version__ = "0.1.0"
