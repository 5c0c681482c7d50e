"""Compression settings: frozen dataclasses, the single source of defaults (the CLI reads them here).

`PackConfig` says what to store (bits, or a bit budget to allocate; ranks; overlays); `CalibConfig` says
how calibration data shapes it (streamed activations, per-layer distillation). `PRESETS` are named
bundles of both, applied under any explicit flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ucformat.bitpack import WIDTHS
from ucformat.rotation import BLOCKS as ROTATION_BLOCKS, DEFAULT_BLOCK as DEFAULT_ROTATION

LOWRANK_DTYPES = ("float16", "int8")
INPUT_MODES = ("online", "teacher")
FISHER_LABELS = ("data", "model")
FISHER_DRAWS = 4  # label draws per position with --fisher-labels model
E2E_LR_FULL_KL = 0.12  # held-out KL before the stage from which it runs at the full --e2e-lr (finetune.py)
E2E_LR_MIN_SHARE = 1 / 6  # below, the learning rate shrinks with that KL, down to this share of --e2e-lr.
# With searched scales SmolLM2 at 5 bpw starts at 0.0204: 1e-3 raised its held-out KL, 5e-4 lowered it by 4.6%
# (docs/BENCHMARKS.md, stop 24); from 0.1 / 1/3 to 0.12 / 1/6 so that such a student gets 5.1e-4
E2E_TOKENS = 1024  # tokens per end-to-end distillation step (whole sequences: 4 of 256, 1 of 1024)
E2E_TOPK = 256  # the stage's KL over this many of the teacher's tokens when the output head outweighs the
# decoder's linears (finetune.auto_topk). Gemma-3-270M at 4 bpw on the 2-core bfloat16 CPU (docs/BENCHMARKS.md,
# stop 25): a step 22.5 s -> 2.7 s, the pack 2577 s -> 837 s; both stages raised the same held-out full KL (0.129
# -> 0.141 full, 0.147 top-k) and were discarded, so the two packs are the same


@dataclass(frozen=True)
class CalibConfig:
    file: str | None = None  # calibration text (UTF-8, CRLF normalised); None: data-free, no distillation
    articles: str | None = None  # keep only these WikiText articles, e.g. "1-16"
    samples: int = 32  # calibration sequences
    seq_len: int = 256  # tokens per sequence (BOS included where the tokenizer adds one)
    inputs: str = "online"  # inputs of layer i: "online" (the compressed model's) or "teacher" (the fp model's)
    steps: int = 0  # per-layer distillation: Adam steps per decoder layer (one sequence each); 0: none
    # (measured on SmolLM2 at 5 bpw: no gain over GPTQ rounding alone once the end-to-end stage runs)
    lr: float = 1e-3  # Adam learning rate for grids, log-scales, and factors relative to their RMS
    refine_scales: bool = True  # distillation also trains the block scales
    refine_grid: bool = False  # ... and the grid (measured: no gain over scales alone, so off)
    e2e_steps: int = 100  # end-to-end distillation steps (all layers, KL on the logits) after the last layer
    # (the stage's defaults below: bench/e2e_sweep.py on SmolLM2 at 4 bpw, ratio 1.137 -> 1.088; docs/BENCHMARKS.md)
    e2e_lr: float = 3e-3  # its peak Adam learning rate (relative as for per-layer distillation), lowered for a
    # student already close to the teacher (finetune.learning_rate: 1e-3..3e-3 by the held-out KL before the stage)
    e2e_warmup: int = 10  # steps of linear learning-rate warmup before the cosine decay
    e2e_samples: int = 64  # sequences of the end-to-end stage (0: the calibration sequences themselves)
    e2e_len: int = 1024  # their length in tokens (0: seq_len); steps hold E2E_TOKENS tokens, whatever the length
    e2e_norms: bool = True  # the stage also tunes the decoder layers' normalisation weights (stored in source dtype)
    e2e_min_kl: float = 0.01  # the stage runs only when the held-out KL before it is at least this (0: always).
    # Measured on SmolLM2 (docs/BENCHMARKS.md, stop 21): at 6 bpw (KL 0.0067) 100 steps did not lower it and were
    # discarded after 25 minutes; at 5 bpw (KL 0.0226) they took the ppl ratio from 1.027 to 1.019
    e2e_topk: int | None = None  # the stage's KL over the teacher's k most likely tokens per position (0: the whole
    # vocabulary; None: finetune.auto_topk, the top E2E_TOPK where the output head outweighs the decoder's linears)
    gptq: bool = True  # choose codes by activation-aware error feedback (GPTQ-style), not nearest level
    bf16: bool = True  # distillation steps under bfloat16 autocast where the hardware has it (checks stay fp32)
    fisher_samples: int = 4  # sequences whose loss gradients weight the allocation (0: activations only)
    fisher_labels: str = "data"  # the labels of those gradients: "data" (the text's next tokens: empirical
    # Fisher) or "model" (FISHER_DRAWS draws from the fp model's own distribution: the true Fisher, whose
    # expectation is the Hessian of the KL to the fp model; bench/alloc_check.py)
    spill_mb: int = 1024  # activations beyond this many MiB are written to safetensors files under DST
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"--inputs must be one of {', '.join(INPUT_MODES)}, got {self.inputs!r}")
        if self.fisher_labels not in FISHER_LABELS:
            raise ValueError(f"--fisher-labels must be one of {', '.join(FISHER_LABELS)}, got {self.fisher_labels!r}")
        if self.samples < 1 or self.seq_len < 8:
            raise ValueError(f"--calib-samples must be >= 1 and --calib-len >= 8, got {self.samples}, {self.seq_len}")
        if min(self.steps, self.e2e_steps, self.e2e_warmup, self.e2e_topk or 0, self.e2e_samples, self.fisher_samples, self.spill_mb) < 0:
            raise ValueError("--steps, --e2e-steps, --e2e-warmup, --e2e-topk, --e2e-samples, --fisher-samples and "
                             "--spill-mb must be >= 0")
        if self.e2e_len and self.e2e_len < 8:
            raise ValueError(f"--e2e-len must be 0 (= --calib-len) or >= 8, got {self.e2e_len}")
        if not self.e2e_min_kl >= 0:
            raise ValueError(f"--e2e-min-kl must be >= 0, got {self.e2e_min_kl}")
        if not self.lr > 0 or not self.e2e_lr > 0:
            raise ValueError(f"--lr and --e2e-lr must be > 0, got {self.lr}, {self.e2e_lr}")


@dataclass(frozen=True)
class PackConfig:
    bits: int = 4  # code width of every quantized linear: one of 2, 3, 4, 5, 6, 8 (ignored with target_bpw)
    block_size: int = 64  # weights per absmax scale, along the input dimension
    scale_bits: int = 16  # how block scales are stored: 16 (float16) or 8 (8-bit codes under a float16 row
    # maximum: 0.125 + 16/C bits a weight instead of 0.25 at block 64). Not the default: at a 5 bpw budget on
    # SmolLM2 the allocator's use of the freed 0.1 bpw measured within noise (docs/BENCHMARKS.md, stop 16)
    codec: str = "gsq"  # "gsq" (learned grid) or "uniform" (round-to-nearest baseline)
    scale_search: bool | None = None  # gsq: each block's scale searched for the grid (codecs.fitted_scales), not
    # its absmax; None: with calibration data only (plain packs stay as the foundation measured them). On SmolLM2
    # at 5 bpw it lowers the held-out KL before the end-to-end stage by 10%, and with the stage's lower learning
    # rate for such a student (E2E_LR_MIN_SHARE) the ppl ratio goes 1.0215 -> 1.0188 (docs/BENCHMARKS.md, stop 24)
    device: str = "cpu"  # where quantization runs: "cpu" or "cuda"
    quantize_embeddings: bool = False  # also quantize token embeddings / lm_head (kept in source dtype by default)
    rank: int = 0  # low-rank correction rank of every linear (0: none, unless the allocator picks one)
    max_rank: int = 32  # with target_bpw and rank 0: the allocator may give a linear any rank up to this
    lowrank_dtype: str = "int8"  # how factors are stored: "int8" (per-row fp16 scale) or "float16"
    target_bpw: float | None = None  # all-in bits-per-weight budget: allocate bits/ranks/overlays per tensor
    overlay: float = 0.0  # share of rows restored at 8 bits in tensors of <= 3 bits (without target_bpw)
    rotation: int | None = None  # Hadamard block of the incoherence rotation of every linear's inputs (SPEC.md
    # 2.5); 0: none; None: DEFAULT_ROTATION with calibration data (bench/rotation_e2e.py: held-out KL -31% at
    # 5 bpw before the end-to-end stage), none without (plain packs stay as the foundation measured them)
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        if self.bits not in WIDTHS:
            raise ValueError(f"--bits must be one of {', '.join(map(str, WIDTHS))}, got {self.bits}")
        if not 8 <= self.block_size <= 4096:
            raise ValueError(f"--block-size must be in 8..4096, got {self.block_size}")
        if self.scale_bits not in (8, 16):
            raise ValueError(f"--scale-bits must be 8 or 16, got {self.scale_bits}")
        if self.codec not in ("gsq", "uniform"):
            raise ValueError(f"--codec must be gsq or uniform, got {self.codec!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if not 0 <= self.rank <= 1024 or not 0 <= self.max_rank <= 1024:
            raise ValueError(f"--rank and --max-rank must be in 0..1024, got {self.rank}, {self.max_rank}")
        if self.lowrank_dtype not in LOWRANK_DTYPES:
            raise ValueError(f"--lowrank-dtype must be one of {', '.join(LOWRANK_DTYPES)}, got {self.lowrank_dtype!r}")
        if self.target_bpw is not None and not 2.0 <= self.target_bpw <= 16.0:
            raise ValueError(f"--target-bpw must be in 2..16, got {self.target_bpw}")
        if not 0.0 <= self.overlay <= 0.5:
            raise ValueError(f"--overlay must be in 0..0.5, got {self.overlay}")
        if self.rotation not in (None, 0, *ROTATION_BLOCKS):
            raise ValueError(f"--rotation must be 0 or one of {', '.join(map(str, ROTATION_BLOCKS))}, got {self.rotation}")

    @property
    def rotation_block(self) -> int:
        """The rotation in force: --rotation, else DEFAULT_ROTATION with calibration data, else 0."""
        if self.rotation is not None:
            return self.rotation
        return DEFAULT_ROTATION if self.calib.file is not None else 0

    @property
    def searches_scales(self) -> bool:
        """Whether block scales are searched (--scale-search; by default with calibration data): for the learned
        grid only, uniform is absmax."""
        wanted = self.calib.file is not None if self.scale_search is None else self.scale_search
        return wanted and self.codec == "gsq"

    @property
    def calibrated(self) -> bool:
        """Whether the pack goes through the calibrated pipeline (anything beyond the plain codec)."""
        return (self.calib.file is not None or self.target_bpw is not None or self.rank > 0
                or self.overlay > 0)

    def settings(self) -> dict:
        """What must match for --resume to continue a pack (device may differ; the calibration file is
        identified by its content hash, added by the caller)."""
        d = asdict(self)
        d.pop("device")
        d.pop("rotation")
        if self.scale_bits == 16:  # as journals written before the option have it
            d.pop("scale_bits")
        d.pop("scale_search")
        if self.searches_scales:  # absent otherwise, as journals written before the option have it
            d["scale_search"] = True
        if not self.calibrated:  # plain packs keep the foundation's journal settings
            for k in ("rank", "max_rank", "lowrank_dtype", "target_bpw", "overlay", "calib"):
                d.pop(k)
        else:
            d["calib"].pop("spill_mb")
            d["calib"].pop("e2e_min_kl")  # decided after the last layer: nothing stored depends on it before
            d["calib"].pop("file")
        if self.rotation_block:  # absent when 0, as journals written before the option have it
            d["rotation"] = self.rotation_block
        return d


# Named recipes. Tier presets allocate an all-in budget; "seed" is the fixed recipe the issue started from.
PRESETS: dict[str, dict] = {
    "lossless-6": {"target_bpw": 6.0},
    "prod-5": {"target_bpw": 5.0},
    "light-4": {"target_bpw": 4.0},
    "aggressive-3": {"target_bpw": 3.0},
    "extreme-2.8": {"target_bpw": 2.8},
    "seed": {"bits": 5, "block_size": 64, "rank": 32, "lowrank_dtype": "float16", "steps": 200, "e2e_steps": 0},
}


def build_config(preset: str | None = None, **overrides) -> PackConfig:
    """PackConfig from defaults < preset < explicit overrides (None means "not given").

    Keys may name PackConfig or CalibConfig fields; unknown keys are an error.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    values = {**(PRESETS[preset] if preset else {}), **{k: v for k, v in overrides.items() if v is not None}}
    pack_keys = {f.name for f in fields(PackConfig)} - {"calib"}
    calib_keys = {f.name for f in fields(CalibConfig)}
    unknown = set(values) - pack_keys - calib_keys
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    calib = replace(CalibConfig(), **{k: v for k, v in values.items() if k in calib_keys})
    return PackConfig(**{k: v for k, v in values.items() if k in pack_keys}, calib=calib)
