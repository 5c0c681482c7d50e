"""Fuzzing the readers (hypothesis, bounded): a tiny pack altered as an attacker or a bad disk would, then
loaded, run and deep-verified. Every case must end in the format's own named error (a PackError) or in a
correct run; any other exception, a crash or a hang fails the test.

Alterations, each either consistent (the manifest's size and SHA-256 of the file refreshed, so only the
structure can give it away) or not: byte flips anywhere (header-heavy), truncations, the 8-byte header
length, a tensor's data offsets, dtype or shape in a file header, manifest edits (a field of an entry or
of the manifest set to a hostile JSON value, an entry deleted or added), and consistent rewrites (an entry
dropped with its tensors, a raw tensor re-shaped or re-typed with its entry, an entry moved to another
file, a tensor nobody refers to added). The number of cases tried is printed; docs/SERVER.md records it.
UC_FUZZ_EXAMPLES=N runs N cases instead of the suite's bounded default.
"""

from __future__ import annotations

import collections
import faulthandler
import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

import ucformat
from ucformat import PackReader
from ucformat.errors import PackError
from ucformat.inspect import summary, verify
from ucformat.manifest import MANIFEST_NAME

EXAMPLES = int(os.environ.get("UC_FUZZ_EXAMPLES", "500"))
CASE_SECONDS = 30  # a case that takes longer hangs: the tiny pack loads and runs in well under a second
TALLY: collections.Counter = collections.Counter()  # (alteration, outcome) -> cases
SLOWEST: list[tuple[float, str, str, str]] = []  # (seconds, alteration, outcome, residency) per case


class CaseHung(BaseException):
    """Raised by the per-case alarm; a BaseException, so no `except Exception` in the readers swallows it."""


@pytest.fixture(scope="module")
def tiny_pack(tiny_templates, tmp_path_factory) -> Path:
    """Tiny Llama at 3 bits with every optional part: 8-bit scales, int8 low-rank factors, overlay rows,
    rotation signs; raw norms and embeddings."""
    from compressor.config import PackConfig
    from compressor.pack import pack

    dst = tmp_path_factory.mktemp("fuzz") / "pack"
    pack(tiny_templates("llama"), dst, PackConfig(bits=3, block_size=32, scale_bits=8, rank=2, overlay=0.05,
                                                  rotation=16), progress=False)
    return dst


# -- file surgery --------------------------------------------------------------------------------------------
def _manifest(pack: Path) -> dict:
    return json.loads((pack / MANIFEST_NAME).read_text())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".fuzz-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _refresh(pack: Path, *rels: str) -> None:
    """The manifest's size and hash of `rels` made to match the files: only the structure is wrong then."""
    m = _manifest(pack)
    for rel in rels:
        data = (pack / rel).read_bytes()
        m["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write(pack / MANIFEST_NAME, json.dumps(m).encode())


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _tensor_files(pack: Path) -> list[str]:
    return sorted(rel for rel in _manifest(pack)["files"] if rel.endswith(".safetensors"))


HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**31, 2**63, -2**40]),
                    st.floats(allow_nan=True), st.text(max_size=6), st.lists(st.integers(-2, 300), max_size=4),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _maybe_refresh(pack: Path, rel: str, draw) -> str:
    """Whether the manifest is made to vouch for the altered file (its size and hash refreshed): drawn."""
    if draw(st.booleans()):
        _refresh(pack, rel)
        return "consistent"
    return "inconsistent"


# -- alterations: each takes the pack and hypothesis' draw, returns a label -----------------------------------
def flip(pack: Path, draw) -> str:
    rel = draw(st.sampled_from(_tensor_files(pack) + [MANIFEST_NAME, "config.json"]))
    data = bytearray((pack / rel).read_bytes())
    n8 = struct.unpack("<Q", bytes(data[:8]))[0] + 8 if rel.endswith(".safetensors") else len(data)
    at = draw(st.one_of(st.integers(0, min(n8, len(data)) - 1), st.integers(0, len(data) - 1)))
    data[at] ^= draw(st.integers(1, 255))
    _write(pack / rel, bytes(data))
    return f"flip {_maybe_refresh(pack, rel, draw) if rel != MANIFEST_NAME else 'inconsistent'}"


def truncate(pack: Path, draw) -> str:
    rel = draw(st.sampled_from(_tensor_files(pack)))
    data = (pack / rel).read_bytes()
    _write(pack / rel, data[:draw(st.integers(0, len(data) - 1))])
    return f"truncate {_maybe_refresh(pack, rel, draw)}"


def header_length(pack: Path, draw) -> str:
    rel = draw(st.sampled_from(_tensor_files(pack)))
    data = (pack / rel).read_bytes()
    n = draw(st.one_of(st.sampled_from([0, 1, 7, len(data) - 8, len(data), 2**63, 2**64 - 1]),
                       st.integers(0, len(data) + 64)))
    _write(pack / rel, struct.pack("<Q", n) + data[8:])
    _refresh(pack, rel)
    return "header length"


def header_field(pack: Path, draw) -> str:
    """A tensor's data_offsets, dtype or shape in a file header, rewritten (the header re-serialised)."""
    rel = draw(st.sampled_from(_tensor_files(pack)))
    header, body = _split((pack / rel).read_bytes())
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["data_offsets", "dtype", "shape"]))
    t = header[key]
    if field == "data_offsets":
        a, b = t["data_offsets"]
        t["data_offsets"] = draw(st.one_of(st.just([b, a]), st.tuples(st.integers(-4, len(body) + 4),
                                                                        st.integers(-4, len(body) + 4)).map(list)))
    elif field == "dtype":
        t["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "I32", "I64", "F64", "BOOL",
                                           "F8_E4M3", "U16", "XX", ""]))
    else:
        shape = t["shape"]
        t["shape"] = draw(st.one_of(st.just(shape[::-1]), st.just([]), st.just(shape + [1]),
                                    st.just([s * 2 for s in shape]), st.just([max(1, s // 2) for s in shape]),
                                    st.lists(st.integers(-1, 70), max_size=3)))
    _write(pack / rel, _join(header, body))
    _maybe_refresh(pack, rel, draw)
    return f"header {field}"


def manifest_field(pack: Path, draw) -> str:
    """A field of a tensor entry, of a file entry or of the manifest set to a hostile value, or an entry
    deleted or added (the manifest is not hashed: every edit of it is 'consistent')."""
    m = _manifest(pack)
    where = draw(st.sampled_from(["entry", "entry", "entry", "files", "top", "delete", "add"]))
    if where == "entry":
        name = draw(st.sampled_from(sorted(m["tensors"])))
        key = draw(st.sampled_from(["shape", "dtype", "kind", "file", "bits", "block_size", "rank", "lowrank_dtype",
                                    "overlay_rows", "scale_bits", "rotation", "stored_bytes"]))
        e = m["tensors"][name]
        e[key] = draw(st.one_of(HOSTILE, _near(e.get(key))))
    elif where == "files":
        rel = draw(st.sampled_from(sorted(m["files"])))
        m["files"][rel][draw(st.sampled_from(["bytes", "sha256"]))] = draw(HOSTILE)
    elif where == "top":
        key = draw(st.sampled_from(["num_layers", "layer_prefix", "requires", "version", "format", "files",
                                    "tensors", "quant", "source", "model_type"]))
        m[key] = draw(st.one_of(HOSTILE, _near(m.get(key))))
    elif where == "delete":
        del m["tensors"][draw(st.sampled_from(sorted(m["tensors"])))]
    else:
        donor = m["tensors"][draw(st.sampled_from(sorted(m["tensors"])))]
        m["tensors"][draw(st.sampled_from(["model.layers.0.extra.weight", "lm_head.weight", "model.layers.7.x",
                                           "model.norm.weight.qcodes"]))] = dict(donor)
    _write(pack / MANIFEST_NAME, json.dumps(m).encode())
    return f"manifest {where}"


def _near(value):
    """Plausible wrong values next to a real one: what a careful attacker would write."""
    if isinstance(value, int) and not isinstance(value, bool):
        return st.sampled_from([value - 1, value + 1, value * 2, 0])
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return st.sampled_from([value[::-1], value[:-1], value + [1], [v * 2 for v in value]])
    if isinstance(value, str):
        return st.sampled_from([value + "x", value.upper(), "", "float16", "bfloat16", "quantized", "raw",
                                "layers/layer-00001.safetensors", "nonlayer.safetensors"])
    return st.none()


def rewrite(pack: Path, draw) -> str:
    """Self-consistent packs that are wrong for their model: files rewritten, manifest entries and hashes to match."""
    m = _manifest(pack)
    what = draw(st.sampled_from(["drop", "reshape", "retype", "move", "extra"]))
    raw = sorted(n for n, e in m["tensors"].items() if e["kind"] == "raw")
    name = draw(st.sampled_from(raw if what in ("reshape", "retype") else sorted(m["tensors"])))
    e = m["tensors"][name]
    rel = e["file"]
    tensors = load((pack / rel).read_bytes())
    mine = sorted(k for k in tensors if k == name or k.startswith(name + "."))
    touched = [rel]
    if what == "drop":
        for k in mine:
            del tensors[k]
        del m["tensors"][name]
    elif what == "reshape":
        t = tensors[name].flatten()
        n = draw(st.integers(0, 2 * t.numel()))
        t = torch.cat([t, t])[:n]  # cut, or grown with its own values
        shape = draw(st.sampled_from([[n], [1, n]] + ([[n // 2, 2]] if n % 2 == 0 else [])))
        tensors[name] = t.reshape(shape).contiguous()
        e["shape"] = shape
    elif what == "retype":
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
        tensors[name] = tensors[name].to(getattr(torch, dtype))
        e["dtype"] = dtype
    elif what == "move":
        other = draw(st.sampled_from([r for r in _tensor_files(pack) if r != rel]))
        theirs = load((pack / other).read_bytes())
        for k in mine:
            theirs[k] = tensors.pop(k)
        _write(pack / other, save(theirs))
        e["file"] = other
        touched.append(other)
    else:
        tensors[draw(st.sampled_from([name + ".qextra", "stray", name + ".lr_u"]))] = torch.zeros(2, 2)
    _write(pack / rel, save(tensors))
    _write(pack / MANIFEST_NAME, json.dumps(m).encode())
    _refresh(pack, *touched)
    return f"rewrite {what}"


ALTERATIONS = [flip, truncate, header_length, header_field, manifest_field, rewrite]


# -- the oracle ----------------------------------------------------------------------------------------------
def run_case(pack: Path, residency: str) -> str:
    """Load and run the pack, then deep-verify it. Returns 'error <Name>' or 'ran'; anything else raises."""
    outcome = "ran"
    try:
        # stream: a budget of the non-layer weights plus one layer, so that every layer is read per pass
        budget = ucformat.plan(pack, residency="dense").min_stream_bytes if residency == "stream" else None
        model = ucformat.load(pack, residency=residency, vram_budget=budget, kernels=False, prefetch=False)
        with torch.inference_mode():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        model.uc_runtime.close()
        assert logits.shape == (1, 4, model.config.vocab_size)
    except PackError as exc:
        outcome = f"error {type(exc).__name__}"
    try:
        reader = PackReader(pack)
        summary(reader)
        for _, err in verify(reader, deep=True):
            assert err is None or isinstance(err, PackError)
    except PackError:
        pass
    return outcome


def _on_alarm(signum, frame):
    raise CaseHung(f"a case ran past {CASE_SECONDS} s")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_altered_packs_fail_cleanly_or_run(tiny_pack, data):
    alter = data.draw(st.sampled_from(ALTERATIONS), label="alteration")
    residency = data.draw(st.sampled_from(["dense", "packed", "stream"]), label="residency")
    with tempfile.TemporaryDirectory(prefix="uc-fuzz-") as tmp:
        pack = Path(shutil.copytree(tiny_pack, Path(tmp) / "pack"))
        label = alter(pack, data.draw)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        faulthandler.dump_traceback_later(3 * CASE_SECONDS, exit=True)  # a hang in native code: die loudly
        t0 = time.perf_counter()
        try:
            outcome = run_case(pack, residency)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            faulthandler.cancel_dump_traceback_later()
    TALLY[(label, outcome)] += 1
    SLOWEST.append((time.perf_counter() - t0, label, outcome, residency))


def test_report_fuzz_tally():
    """Runs after the fuzz test (file order): how many cases were tried, and how each ended."""
    total = sum(TALLY.values())
    if total == 0:
        pytest.skip("the fuzz test did not run")
    lines = [f"{n:5d}  {label:28s} {outcome}" for (label, outcome), n in sorted(TALLY.items())]
    slow = sorted(SLOWEST, reverse=True)[:3]
    print(f"\nfuzz: {total} cases, {sum(t for t, *_ in SLOWEST):.1f} s in the cases, slowest "
          + ", ".join(f"{t:.2f} s ({a}, {o}, {r})" for t, a, o, r in slow) + "\n" + "\n".join(lines))
    assert total >= EXAMPLES
    assert any(o == "ran" for _, o in TALLY) and any(o.startswith("error") for _, o in TALLY)
