"""OpenAI-compatible server for uc packs: FastAPI routes (app.py) over a serving layer (serving*.py) over an
engine with continuous batching (engine.py) that knows nothing about HTTP. See docs/SERVER.md."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ultracompress")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
