"""A pack checked against the model it claims to be (SPEC.md section 7).

Hashes prove that files are the ones the manifest lists; they say nothing of a manifest that lies
consistently (an entry deleted, a norm cut to half its length with its hash updated). Here the model is
built from config.json on the meta device (no memory, milliseconds) and its state dict, turned back into
checkpoint names by transformers' own conversion mapping (fused MoE experts -> per-expert tensors), is
what the pack must hold:

- every weight the architecture has is a manifest entry (tied aliases such as lm_head of a model with
  tied embeddings, buffers, and what the architecture lists as missing on load may be absent), with the
  shape of the built parameter and a dtype the config implies; no entry is something the architecture
  does not have (bar its own list of unexpected names to ignore);
- every entry lives in its layer's file (or nonlayer.safetensors); `num_layers` and `model_type` are the
  model's;
- every tensor in every tensor file is an entry or one of an entry's parts (section 2), with the shape
  and dtype the entry implies, and every such tensor is in the file (headers only: no data is read).

    errors = check(reader)   # [] or one named error per problem, each naming its file and tensor
    require(reader)          # raises the first
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from .assets import load_config
from .errors import ConfigError, ManifestError, PackError, TensorError, describe
from .manifest import DTYPES, MANIFEST_NAME, NONLAYER_FILE, layer_file
from .reader import CONFIG_NAME, PackReader, stored_layout

# safetensors header dtype -> torch dtype, for the dtypes a pack may hold (SPEC.md section 2)
_FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
                "I8": torch.int8, "I32": torch.int32}


@dataclass(frozen=True)
class Weight:
    """One checkpoint tensor of the model config.json builds."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]  # manifest dtypes it may have
    required: bool  # False: a tied alias, a buffer or a name the architecture may miss on load


@dataclass(frozen=True)
class Architecture:
    name: str  # e.g. LlamaForCausalLM
    num_layers: int
    weights: dict[str, Weight]  # checkpoint name -> what it must be
    ignored: tuple[str, ...]  # regexes of checkpoint names the model itself ignores when loading


def architecture(config, path: str = CONFIG_NAME) -> Architecture:
    """The checkpoint the model built from `config` expects. Raises ConfigError (naming `path`, the config's
    file) if it cannot be built."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from .skeleton import find_layers

    dtype = getattr(config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        layers = len(find_layers(model))
        unique = {n for n, _ in model.named_parameters()}
        aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique
        buffers = {n for n, _ in model.named_buffers()}
        state = revert_weight_conversion(model, model.state_dict())
    # a config transformers accepts can still fail to build (negative sizes, strings for numbers, ...)
    except Exception as exc:
        raise ConfigError(path, f"the model cannot be built from it ({describe(exc)})") from None
    allowed = DTYPES if dtype is None else None
    may_miss = tuple(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())  # the architecture's own list
    weights = {}
    for name, t in state.items():
        own = str(t.dtype).removeprefix("torch.")
        dtypes = allowed or tuple(sorted({own, str(dtype).removeprefix("torch.")} & set(DTYPES))) or DTYPES
        required = name not in aliases and name not in buffers and not any(re.search(p, name) for p in may_miss)
        weights[name] = Weight(tuple(t.shape), dtypes, required)
    ignored = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    return Architecture(type(model).__name__, layers, weights, ignored)


def check(reader: PackReader) -> list[PackError]:
    """Every way the pack differs from the model its config.json builds; [] when it conforms."""
    m = reader.manifest
    config = load_config(reader)
    if m.model_type != getattr(config, "model_type", m.model_type):
        return [ManifestError(str(reader.path / MANIFEST_NAME),
                              f"model_type is {m.model_type!r}, config.json's is {config.model_type!r}")]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = getattr(text, "num_hidden_layers", None)
    if isinstance(declared, int) and declared != m.num_layers:  # before building: never build a model the pack is not
        return [ManifestError(str(reader.path / MANIFEST_NAME),
                              f"num_layers is {m.num_layers}, config.json's num_hidden_layers is {declared}")]
    arch = architecture(config, str(reader.path / CONFIG_NAME))
    if arch.num_layers != m.num_layers:
        return [ManifestError(str(reader.path / MANIFEST_NAME),
                              f"num_layers is {m.num_layers}, the {arch.name} config.json builds has {arch.num_layers}")]
    errors: list[PackError] = []
    where = _placement(m.layer_prefix, m.num_layers)
    for name, w in arch.weights.items():
        if name not in m.tensors and w.required:
            errors.append(TensorError(str(reader.path / where(name)), name,
                                      f"{arch.name} (config.json) needs it, and the manifest has no entry for it"))
    for name, e in m.tensors.items():
        at = str(reader.path / e.file)
        w = arch.weights.get(name)
        if w is None:
            if not any(re.search(p, name) for p in arch.ignored):
                errors.append(TensorError(at, name, f"not a weight of {arch.name} (config.json)"))
            continue
        if e.shape != w.shape:
            errors.append(TensorError(at, name, f"shape {list(e.shape)}, {arch.name} (config.json) needs {list(w.shape)}"))
        if e.dtype not in w.dtypes:
            errors.append(TensorError(at, name, f"dtype {e.dtype}, config.json implies {' or '.join(w.dtypes)}"))
        if e.file != where(name):
            errors.append(TensorError(at, name, f"belongs in {where(name)}"))
    for rel in m.files:
        if rel.endswith(".safetensors"):
            errors += _file_errors(reader, rel)
    return errors


def require(reader: PackReader) -> None:
    """Raise the first way the pack differs from its model (the loader calls this before it reads a weight)."""
    errors = check(reader)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.args = (f"{first} (and {len(errors) - 1} more: `uc verify --deep {reader.path}` lists them)",)
        raise first


def _placement(prefix: str, num_layers: int):
    """name -> the file SPEC.md section 1 puts it in."""
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")

    def where(name: str) -> str:
        hit = rx.match(name)
        return layer_file(int(hit.group(1))) if hit and int(hit.group(1)) < num_layers else NONLAYER_FILE

    return where


def _file_errors(reader: PackReader, rel: str) -> list[PackError]:
    """The file's tensors (from its header) against what the manifest's entries for it call for."""
    path = str(reader.path / rel)
    want: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in reader.tensor_names(rel):
        want.update(stored_layout(name, reader.manifest.tensors[name]))
    try:
        p = reader.check_file(rel, deep=False)  # size only: hashes are the reader's business, not the model's
    except PackError as exc:
        return [exc]
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            have = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except SafetensorError as exc:
        return [TensorError(path, "*", f"unreadable safetensors file ({exc})")]
    errors: list[PackError] = []
    for key in sorted(have.keys() - want.keys()):
        errors.append(TensorError(path, key, "in the file, but no manifest entry refers to it"))
    for key in sorted(want.keys() - have.keys()):
        errors.append(TensorError(path, key, "missing from the file"))
    for key in sorted(want.keys() & have.keys()):
        (shape, dtype), (fshape, fdtype) = want[key], have[key]
        if fshape != shape or _FILE_DTYPES.get(fdtype) != dtype:
            errors.append(TensorError(path, key, f"{fdtype} {list(fshape)} in the file, the manifest implies "
                                                 f"{str(dtype).removeprefix('torch.')} {list(shape)}"))
    return errors
