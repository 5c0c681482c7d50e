"""Slot KV cache for continuous batching with a stock transformers model.

Per layer, keys and values live in two buffers of shape [rows, kv_heads, cap, head_dim]. A sequence owns
one row and keeps its position p in column p, so it never moves while it decodes. Rows [0, R) are the
running batch: a decode step feeds R tokens and attends over columns [0, W), W = 1 + the longest length,
with a mask that hides each row's columns past its own length. Rows joining or leaving cost one row copy
(the last running row moves into the hole), never a copy of the whole batch.

The model is driven through two small views that it takes as its `cache` (it only calls `update`):

- `DecodeView`: one new token per running row, written at that row's own column;
- `PrefillView`: new prompt tokens of several sequences packed into one row of input ([1, T]), each
  segment written to its sequence's row at its offset (chunked prefill), attending only within itself.

Masks are built here too (they encode the layout), as booleans (sdpa: True = attend) or as additive
floats for eager attention, with a sliding window where the model has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CAP_STEP = 256  # columns are allocated in multiples of this


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position over all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, config, dtype: torch.dtype, device) -> "KVShape":
        tc = getattr(config, "get_text_config", lambda: config)()
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        kv = getattr(tc, "num_key_value_heads", None) or heads
        return cls(tc.num_hidden_layers, kv, head_dim, dtype, torch.device(device))


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class SlotKVCache:
    def __init__(self, shape: KVShape, budget_bytes: int, max_rows: int) -> None:
        self.shape = shape
        self.budget_tokens = budget_bytes // shape.bytes_per_token
        self.max_rows = max_rows
        self.rows = 0
        self.cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    # -- allocation ---------------------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.cap * self.shape.bytes_per_token

    @property
    def max_len(self) -> int:
        """Longest sequence one row can hold within the budget."""
        return (self.budget_tokens // CAP_STEP) * CAP_STEP

    def fits(self, rows: int, cols: int) -> bool:
        return rows <= self.max_rows and rows * _round_up(max(cols, 1), CAP_STEP) <= self.budget_tokens

    def ensure(self, rows: int, cols: int, used_rows: int, used_cols: int, expect_rows: int = 0) -> None:
        """Make room for `rows` x `cols`, keeping the content of rows [0, used_rows) x columns [0, used_cols).
        Grows geometrically within the budget so that reallocations are rare; when it grows rows it makes room
        for `expect_rows` at once (the rows about to be admitted). Caller checked `fits`."""
        if rows <= self.rows and cols <= self.cap:
            return
        new_rows = max(rows, self.rows)
        if new_rows > self.rows:
            new_rows = max(rows, min(max(2 * self.rows, expect_rows), self.max_rows))
        new_cap = max(_round_up(cols, CAP_STEP), self.cap)
        if new_cap > self.cap:
            new_cap = max(new_cap, min(2 * self.cap, self.max_len))
        while new_rows * new_cap > self.budget_tokens and new_rows > rows:
            new_rows -= 1
        while new_rows * new_cap > self.budget_tokens and new_cap > _round_up(cols, CAP_STEP):
            new_cap -= CAP_STEP
        self._realloc(new_rows, new_cap, used_rows, used_cols)

    def release(self) -> None:
        self.k, self.v, self.rows, self.cap = [], [], 0, 0

    def _realloc(self, rows: int, cap: int, used_rows: int, used_cols: int) -> None:
        s = self.shape
        new_k, new_v = [], []
        for i in range(s.num_layers):
            # zeros, not empty: masked columns still meet a 0-weight multiply, and 0 * NaN garbage is NaN
            k = torch.zeros(rows, s.kv_heads, cap, s.head_dim, dtype=s.dtype, device=s.device)
            v = torch.zeros_like(k)
            if self.k and used_rows and used_cols:
                k[:used_rows, :, :used_cols] = self.k[i][:used_rows, :, :used_cols]
                v[:used_rows, :, :used_cols] = self.v[i][:used_rows, :, :used_cols]
                self.k[i] = self.v[i] = None  # free as we go: peak is one layer over the two sizes
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.rows, self.cap = new_k, new_v, rows, cap

    # -- rows -------------------------------------------------------------------------------------------
    def move_row(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        for k, v in zip(self.k, self.v):
            tk, tv = k[a, :, :length].clone(), v[a, :, :length].clone()
            k[a, :, :length] = k[b, :, :length]
            v[a, :, :length] = v[b, :, :length]
            k[b, :, :length], v[b, :, :length] = tk, tv

    # -- views the model writes through ---------------------------------------------------------------
    def decode_view(self, lens: list[int]) -> "DecodeView":
        return DecodeView(self, lens)

    def prefill_view(self, segments: list[tuple[int, int, int]]) -> "PrefillView":
        return PrefillView(self, segments)


class _View:
    """Duck-types the part of transformers' Cache that the attention layers call."""

    is_compileable = False

    def __init__(self, cache: SlotKVCache) -> None:
        self.cache = cache

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only used when position_ids are missing
        raise NotImplementedError("the engine always passes position_ids")


class DecodeView(_View):
    """Running rows [0, R): row r writes its new token at column lens[r] and attends to [0, W)."""

    def __init__(self, cache: SlotKVCache, lens: list[int]) -> None:
        super().__init__(cache)
        self.n = len(lens)
        self.width = max(lens) + 1
        dev = cache.shape.device
        self.lens = torch.tensor(lens, device=dev)
        self._flat = None

    @property
    def flat(self) -> torch.Tensor:
        """Flat row of (r, h, lens[r]) in a [rows * kv_heads * cap, head_dim] view of a layer's buffer: one
        index_copy_ per layer writes every new key (advanced-index assignment is ~10x slower on the CPU).
        Built on first use: the lean step's own attention op (cpu_ops.attend) writes the cache itself."""
        if self._flat is None:
            heads, cap, dev = self.cache.shape.kv_heads, self.cache.cap, self.lens.device
            rh = torch.arange(self.n, device=dev).unsqueeze(1) * heads + torch.arange(heads, device=dev)
            self._flat = (rh * cap + self.lens.unsqueeze(1)).reshape(-1)
        return self._flat

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [R, kv_heads, 1, head_dim]
        k, v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        d = k.shape[-1]
        k.view(-1, d).index_copy_(0, self.flat, key_states.reshape(-1, d))
        v.view(-1, d).index_copy_(0, self.flat, value_states.reshape(-1, d))
        return k[: self.n, :, : self.width], v[: self.n, :, : self.width]

    def position_ids(self) -> torch.Tensor:
        return self.lens.unsqueeze(1)  # [R, 1]

    def mask(self, window: int | None = None) -> torch.Tensor:
        return decode_mask(self.lens, self.width, window)


class PrefillView(_View):
    """Segments (row, offset, length) packed into one input row of T tokens."""

    def __init__(self, cache: SlotKVCache, segments: list[tuple[int, int, int]]) -> None:
        super().__init__(cache)
        self.segments = segments
        self.fresh = all(off == 0 for _, off, _ in segments)  # no earlier chunk to attend to
        dev = cache.shape.device
        q_seg, q_pos, k_seg, k_pos = [], [], [], []
        for j, (_, off, n) in enumerate(segments):
            q_seg += [j] * n
            q_pos += range(off, off + n)
            k_seg += [j] * (off + n)
            k_pos += range(0, off + n)
        self.q_seg, self.q_pos = torch.tensor(q_seg, device=dev), torch.tensor(q_pos, device=dev)
        self.k_seg, self.k_pos = torch.tensor(k_seg, device=dev), torch.tensor(k_pos, device=dev)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # key_states: [1, kv_heads, T, head_dim]
        kb, vb = self.cache.k[layer_idx], self.cache.v[layer_idx]
        s = 0
        for row, off, n in self.segments:
            kb[row, :, off:off + n] = key_states[0, :, s:s + n]
            vb[row, :, off:off + n] = value_states[0, :, s:s + n]
            s += n
        if self.fresh:
            return key_states, value_states
        keys = torch.cat([kb[row, :, :off + n] for row, off, n in self.segments], dim=1).unsqueeze(0)
        values = torch.cat([vb[row, :, :off + n] for row, off, n in self.segments], dim=1).unsqueeze(0)
        return keys, values

    def position_ids(self) -> torch.Tensor:
        return self.q_pos.unsqueeze(0)  # [1, T]

    def mask(self, window: int | None = None) -> torch.Tensor:
        """[1, 1, T, K] bool: causal within each segment, nothing across segments."""
        if self.fresh:
            k_seg, k_pos = self.q_seg, self.q_pos
        else:
            k_seg, k_pos = self.k_seg, self.k_pos
        m = (self.q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= self.q_pos[:, None])
        if window:
            m &= k_pos[None, :] > (self.q_pos[:, None] - window)
        return m[None, None]


def decode_mask(lens: torch.Tensor, width: int, window: int | None = None) -> torch.Tensor:
    """[R, 1, 1, width] bool for one new token per row at lens [R]: column c visible to row r iff
    c <= lens[r] (and within the window)."""
    cols = torch.arange(width, device=lens.device)
    m = cols.unsqueeze(0) <= lens.unsqueeze(1)
    if window:
        m &= cols.unsqueeze(0) > (lens.unsqueeze(1) - window)
    return m[:, None, None, :]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> 0 / most-negative float, for attention implementations that add the mask."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
