"""uc pack v0.3: the artifact format (SPEC.md), its writer, its verifying lazy reader."""

from . import qtensor, student  # student: registers model_type uc_student with transformers
from .errors import PackError
from .manifest import VERSION, Manifest
from .reader import PackReader, open_pack
from .runtime import load, plan

__version__ = "0.1.0"
__all__ = ["PackError", "PackReader", "Manifest", "VERSION", "load", "open_pack", "plan", "qtensor", "__version__"]
