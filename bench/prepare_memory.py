"""Where the `prepare` stage of a calibrated pack reaches its peak memory (compressor/calibrated.py).

The stage (setup, the profile pass, the Fisher pass) runs as `uc pack SRC DST --target-bpw B --calib WIKITEXT`
runs it, cut to the first --layers decoder layers: minutes instead of an hour, and enough to see one layer's
working set and which code sets it (the layers of a model are profiled alike). A thread samples the resident set
every 10 ms and keeps the main thread's stack at each new high; the resident set after each layer (what the pass
carries from one layer to the next) is printed per pass. --no-trim leaves the heap glibc holds free in place
between layers (rss.trim), as the stage did before: over a full pass that is what made the resident set grow.

    python bench/prepare_memory.py .uc-cache/models/qwen2.5-coder-1.5b --layers 2
    python bench/prepare_memory.py .uc-cache/models/qwen2.5-coder-0.5b --layers 24 [--no-trim]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine  # noqa: E402
from compressor import rss  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


class PeakSampler:
    """The resident set's highest value since start, and where the main thread was when it was reached."""

    def __init__(self, every: float = 0.01) -> None:
        self.peak, self.stack, self.phase = 0, [], "start"
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            now = rss.current()
            if now > self.peak:
                frames = traceback.extract_stack(sys._current_frames().get(self._main))
                self.peak, self.where = now, self.phase
                self.stack = [f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}" for f in frames
                              if f.filename.startswith(str(ROOT)) and "/bench/" not in f.filename][-4:]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="an HF safetensors checkpoint folder (uc fetch-model puts them in .uc-cache/models)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers to run the passes over (default 2)")
    ap.add_argument("--target-bpw", type=float, default=4.0)
    ap.add_argument("--no-trim", action="store_true", help="do not give freed heap back between layers (as before)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    a = ap.parse_args()

    from compressor.calibrated import CalibratedLayers
    from compressor.checkpoint import SourceCheckpoint
    from compressor.config import build_config
    from compressor.pack import is_quantized_layer_tensor

    ckpt = SourceCheckpoint(a.src)
    if not 1 <= a.layers <= ckpt.num_layers:
        raise SystemExit(f"--layers must be 1..{ckpt.num_layers}, got {a.layers}")
    ckpt.num_layers = a.layers
    cfg = build_config(target_bpw=a.target_bpw, file=str(TEXT), articles="1-16")
    sampler = PeakSampler()
    between: dict[str, list[int]] = {}  # pass -> resident bytes after each of its layers
    trim = rss.trim

    def after_layer() -> None:
        if not a.no_trim:
            trim()
        between.setdefault(sampler.phase, []).append(rss.current())

    rss.trim = after_layer
    base = rss.current()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        stage = CalibratedLayers(ckpt, cfg, Path(work), is_quantized_layer_tensor, progress=False)
        for name in ("_stats_pass", "_fisher_pass"):
            def phase(*args, _run=getattr(stage, name), _name=name.strip("_").split("_")[0], **kw):
                sampler.phase = {"stats": "profile"}.get(_name, _name)
                return _run(*args, **kw)
            setattr(stage, name, phase)
        sampler.phase = "setup"
        stage.prepare()
        stage.close()
    sampler.close()
    out = {"src": str(a.src), "layers": a.layers, "target_bpw": a.target_bpw, "peak_rss_bytes": sampler.peak,
           "baseline_rss_bytes": base, "phases": getattr(stage.report, "peak_rss_bytes", {}), "peak_phase": sampler.where,
           "peak_stack": sampler.stack, "trim": not a.no_trim,
           "between_layers_bytes": between, "seconds": round(time.perf_counter() - t0, 1), "machine": machine()}
    if a.json:
        print(json.dumps(out))
        return
    flags = f"--target-bpw {a.target_bpw:g}" + (" --no-trim" if a.no_trim else "")
    print(f"{a.src.name}, {a.layers} layers, {flags}: prepare peak RSS "
          f"{sampler.peak / 2**20:.0f} MiB ({base / 2**20:.0f} MiB before it), reached in the {sampler.where} phase at")
    print("  " + "\n  ".join(reversed(sampler.stack)))
    for phase, xs in between.items():
        print(f"  after each {phase} layer (MiB): " + " ".join(f"{x / 2**20:.0f}" for x in xs))
    print("  phase peaks (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in out["phases"].items()))
    print(f"  {out['seconds']:.0f} s; {out['machine']}")


if __name__ == "__main__":
    main()
