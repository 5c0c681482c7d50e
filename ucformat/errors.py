"""Named errors for every rule in SPEC.md. Each one says which file or tensor is wrong and what to do."""

from __future__ import annotations


class PackError(Exception):
    """Base class: anything wrong with a uc pack on disk. Errors about one file keep its path in `path`."""


class NotAPack(PackError):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: not a uc pack ({why})")


class IncompletePack(PackError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path}: pack is incomplete (no manifest.json; a `uc pack` was interrupted). "
            "Re-run the same `uc pack ... --resume` to finish it."
        )


class UnsupportedVersion(PackError):
    def __init__(self, path: str, version: str, supported: str) -> None:
        super().__init__(
            f"{path}: pack format version {version!r} is not readable by this reader "
            f"(it reads major version {supported}); upgrade ultracompress or re-pack."
        )


class UnsupportedFeature(PackError):
    def __init__(self, path: str, feature: str) -> None:
        super().__init__(f"{path}: pack requires feature {feature!r}, unknown to this reader; upgrade ultracompress.")


class ManifestError(PackError):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: invalid manifest: {why}")
        self.path = path


class MissingFile(PackError):
    def __init__(self, path: str) -> None:
        super().__init__(f"{path}: file listed in the manifest is missing")
        self.path = path


class SizeMismatch(PackError):
    def __init__(self, path: str, expected: int, actual: int) -> None:
        super().__init__(f"{path}: size is {actual} bytes, manifest says {expected} (truncated or altered)")
        self.path = path


class HashMismatch(PackError):
    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"{path}: SHA-256 is {actual[:16]}..., manifest says {expected[:16]}... (file altered)")
        self.path = path


class TensorError(PackError):
    def __init__(self, file: str, tensor: str, why: str) -> None:
        super().__init__(f"{file}: tensor {tensor!r}: {why}")
        self.path, self.tensor = file, tensor


class ConfigError(PackError):
    """config.json cannot be read as the transformers config of a model this pack could be."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path


class TokenizerError(PackError):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: the pack's tokenizer cannot be loaded ({why}); re-copy the source model's "
                         "tokenizer files and re-pack, or restore the pack")


def describe(exc: BaseException) -> str:
    """'Type: message' on one line, for a foreign library's exception quoted inside a named error (transformers'
    validation errors put their cause on a second line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:3]) if lines else 'no message'}"
