"""A pack's config and tokenizer as transformers objects, loaded only from files the manifest vouches for.

transformers reads whatever a folder holds (an added `tokenizer.json` would win over the packed
sentencepiece model), so the pack's small files (everything but the tensor files) are read once,
checked against the manifest's size and SHA-256 (SPEC.md section 5), and copied into a private folder
that transformers then reads. What transformers cannot load is a named error, not its traceback.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from .errors import ConfigError, HashMismatch, SizeMismatch, TokenizerError, describe
from .reader import CONFIG_NAME, PackReader

log = logging.getLogger(__name__)


def load_config(reader: PackReader):
    """The pack's config.json as a transformers config (the one its model is built from)."""
    from transformers import AutoConfig

    reader.config_dict()  # listed, hash-checked, a JSON object: the plain errors first
    with tempfile.TemporaryDirectory(prefix="uc-assets-") as tmp:
        _verified_copy(reader, Path(tmp), [CONFIG_NAME])
        try:
            return AutoConfig.from_pretrained(tmp)
        # transformers raises whatever the bad field makes its code raise (ValueError, KeyError, TypeError, its
        # strict dataclass validation errors, ...)
        except Exception as exc:
            raise ConfigError(str(reader.path / CONFIG_NAME), f"not a config transformers can load "
                                                              f"({_describe(exc, tmp, reader)})") from None


def has_tokenizer(reader: PackReader) -> bool:
    """Whether the pack holds tokenizer files (the source model's, copied when it had them: SPEC.md section 1)."""
    return any(Path(rel).name.startswith("tokenizer") for rel in reader.manifest.files)


def load_tokenizer(reader: PackReader):
    """The pack's tokenizer, from its verified small files only."""
    from transformers import AutoTokenizer

    load_config(reader)  # transformers reads config.json to pick the tokenizer class: its errors as its own
    small = [rel for rel in reader.manifest.files if not rel.endswith(".safetensors")]
    with tempfile.TemporaryDirectory(prefix="uc-assets-") as tmp:
        _verified_copy(reader, Path(tmp), small)
        try:
            tok = AutoTokenizer.from_pretrained(tmp)
            tok.decode(tok("Hello").input_ids)  # loads is not enough: it must also encode and decode
        except Exception as exc:  # json, tokenizers (a bare Exception), sentencepiece, OSError for none at all
            raise TokenizerError(str(reader.path), _describe(exc, tmp, reader)) from None
    return tok


def _verified_copy(reader: PackReader, dst: Path, rels: list[str]) -> None:
    """Copy `rels` from the pack into `dst`, each checked against the manifest as read (no second read)."""
    for rel in rels:
        src = reader.check_file(rel, deep=False)  # listed, present, a regular file
        data = src.read_bytes()
        entry = reader.manifest.files[rel]
        if len(data) != entry.bytes:
            raise SizeMismatch(str(src), entry.bytes, len(data))
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise HashMismatch(str(src), entry.sha256, digest)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)


def _describe(exc: BaseException, tmp: str, reader: PackReader) -> str:
    """errors.describe, naming the pack where transformers named the private copy."""
    return describe(exc).replace(tmp, str(reader.path))
