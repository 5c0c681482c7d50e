"""Compression settings: one frozen dataclass, the single source of defaults (the CLI reads them here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ucformat.bitpack import WIDTHS


@dataclass(frozen=True)
class PackConfig:
    bits: int = 4  # code width of every quantized linear: one of 2, 3, 4, 5, 6, 8
    block_size: int = 64  # weights per absmax scale, along the input dimension
    codec: str = "gsq"  # "gsq" (learned grid) or "uniform" (round-to-nearest baseline)
    device: str = "cpu"  # where quantization runs: "cpu" or "cuda"
    quantize_embeddings: bool = False  # also quantize token embeddings / lm_head (kept in source dtype by default)

    def __post_init__(self) -> None:
        if self.bits not in WIDTHS:
            raise ValueError(f"--bits must be one of {', '.join(map(str, WIDTHS))}, got {self.bits}")
        if not 8 <= self.block_size <= 4096:
            raise ValueError(f"--block-size must be in 8..4096, got {self.block_size}")
        if self.codec not in ("gsq", "uniform"):
            raise ValueError(f"--codec must be gsq or uniform, got {self.codec!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")

    def settings(self) -> dict:
        """What must match for --resume to continue a pack (device may differ)."""
        d = asdict(self)
        d.pop("device")
        return d
