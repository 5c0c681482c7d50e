"""Streamed calibration: the calibration sequences, their hidden states flowing one decoder layer at a
time, and the statistics compression takes from them.

  `calibration_ids`  N sequences of T tokens from a text (evenly spread over it, deterministic).
  `Stream`           the hidden states of every sequence at one depth: chunks [B, T, H] in an
                     ActivationStore (bounded memory), with the per-layer call kwargs of each chunk.
  `LinearStats`      hooks on a layer's nn.Linear modules: input Gram matrices H = sum x x^T and, in a
                     backward pass, the output-gradient energy F = sum (dL/dy)^2 per output channel.
  `head_grad`        d(next-token NLL)/d(final hidden states), in position chunks (bounded logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layerwise
from .activations import ActivationStore
from .evaluate import make_windows, wikitext_articles

LOGIT_FLOATS = 16 << 20  # logits per chunk in head_grad (64 MiB of float32): rows = this // vocab


def calibration_ids(tokenizer, text: str, samples: int, seq_len: int, articles: str | None = None,
                    flags: tuple[str, str] = ("--calib-samples", "--calib-len")) -> torch.Tensor:
    """[N, T] token ids: N windows of T tokens, evenly spaced over the (CRLF-normalised) text. `flags` name
    the options that set N and T, for the error when the text is too short."""
    text = text.replace("\r\n", "\n")
    if articles:
        text = wikitext_articles(text, articles)
    try:
        windows = make_windows(tokenizer, text, seq_len, None)
    except ValueError:  # not even one window
        windows = torch.zeros(0, seq_len, dtype=torch.long)
    if len(windows) < samples:
        raise ValueError(f"calibration text has {len(windows)} windows of {seq_len} tokens; "
                         f"{flags[0]} {samples} asks for more (use a longer text, fewer samples or a shorter {flags[1]})")
    idx = torch.linspace(0, len(windows) - 1, samples).round().long()
    return windows[idx]


def plain(obj, memo: dict | None = None):
    """Copy of obj with every tensor cloned out of inference mode (autograd may save it), sharing kept.

    `memo` maps id(original) -> (original, copy). Holding the original keeps its id from being reused
    by a later tensor while the memo lives (ids are addresses: a freed tensor's id comes back)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.clone())
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(plain(o, memo) for o in obj)
    if isinstance(obj, list):
        return [plain(o, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: plain(v, memo) for k, v in obj.items()}
    return obj


@dataclass
class Stream:
    """Hidden states of all calibration sequences entering one layer, chunk by chunk."""

    store: ActivationStore
    batches: list[layerwise.Batch]  # one per chunk: input ids and per-layer kwargs

    def chunks(self):
        return zip(self.store, self.batches)


def embed_stream(sk, ids: torch.Tensor, chunk: int, store: ActivationStore) -> Stream:
    """Embed the calibration ids chunk by chunk; kwargs are plain tensors (usable under autograd)."""
    batches = []
    for c in ids.split(chunk):
        h, b = layerwise.embed(sk, c)
        store.append(plain(h))
        # one memo per chunk: the layers of a chunk share its rotary tables and masks, chunks share nothing
        batches.append(layerwise.Batch(input_ids=b.input_ids, layer_kwargs=plain(b.layer_kwargs, {})))
    return Stream(store, batches)


def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, weights: dict | None = None) -> torch.Tensor:
    """One decoder layer on hidden [B, T, H]; `weights` overrides parameters by local name (differentiable)."""
    if weights:
        out = torch.func.functional_call(layer, weights, (hidden,), kwargs, strict=False)
    else:
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward_stream(layer: torch.nn.Module, index: int, stream: Stream, out: ActivationStore,
                   weights: dict | None = None) -> Stream:
    """Apply layer `index` to every chunk of stream; results appended to out (same chunking)."""
    for h, b in stream.chunks():
        out.append(call_layer(layer, h, b.layer_kwargs[index], weights))
    return Stream(out, stream.batches)


def linear_modules(layer: torch.nn.Module, names: list[str], prefix: str) -> dict[str, str]:
    """{checkpoint name: module path inside the layer} for weights that are a plain nn.Linear's weight.

    Only those get activation statistics and are trained by distillation; others (e.g. MoE experts fused
    into 3-D stacks by the loader) are quantized from their weights alone.
    """
    out = {}
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".weight")):
            continue
        path = name[len(prefix):-len(".weight")]
        try:
            mod = layer.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = path
    return out


class LinearStats:
    """Context manager: hooks on the given Linear modules of one layer, accumulating (float64)
      gram[name]   [C, C]  sum over tokens of x x^T of the module's input      (gram=True)
      fisher[name] [R]     sum over tokens of (dL/dy_r)^2 of its output        (fisher=True, on backward)
    and `tokens`, the number of input rows seen by each module."""

    def __init__(self, layer: torch.nn.Module, modules: dict[str, str], gram: bool = True, fisher: bool = False) -> None:
        self.layer, self.modules = layer, modules
        self.want_gram, self.want_fisher = gram, fisher
        self.gram: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = []
        self._last: tuple | None = None  # (x, x^T x, first module): q/k/v (gate/up) get one input object
        self.leader: dict[str, str] = {}  # module -> the first module that saw the same input

    def __enter__(self) -> "LinearStats":
        for name, path in self.modules.items():
            mod = self.layer.get_submodule(path)
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            x2 = x.detach().reshape(-1, x.shape[-1])
            self.tokens[name] = self.tokens.get(name, 0) + x2.shape[0]
            if self.want_gram:
                if self._last is None or self._last[0] is not x:
                    xf = x2.float()
                    self._last = (x, (xf.T @ xf).double(), name)
                xtx = self._last[1]
                self.leader[name] = self._last[2]
                acc = self.gram.get(name)
                self.gram[name] = xtx.clone() if acc is None else acc.add_(xtx)
            if self.want_fisher and output.requires_grad:
                def grad_hook(g, name=name):
                    e = g.detach().float().reshape(-1, g.shape[-1]).square().sum(0).double()
                    acc = self.fisher.get(name)
                    self.fisher[name] = e if acc is None else acc.add_(e)
                output.register_hook(grad_hook)
        return hook

    def groups(self) -> dict[str, list[str]]:
        """Modules by shared input: first module -> all of them (one Gram matrix serves the group)."""
        out: dict[str, list[str]] = {}
        for name, lead in self.leader.items():
            out.setdefault(lead, []).append(name)
        return out

    def take_means(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every module's mean Gram matrix E[x x^T], float32 on device; the float64 sums are dropped (at 8960
        input columns one is 642 MB, and nothing reads it past its mean)."""
        means = {n: (g / max(self.tokens.get(n, 1), 1)).float().to(device) for n, g in self.gram.items()}
        self.gram.clear()
        return means


def head_grad(sk, hidden: torch.Tensor, batch: layerwise.Batch,
              draw: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Gradient of the summed next-token NLL w.r.t. the last layer's output [B, T, H], and that NLL.
    The labels are the text's next tokens, or with `draw` tokens sampled from the model's own distribution
    (whose squared gradients average to the true Fisher rather than the empirical one).

    The head runs over (sequence, position) rows in chunks of LOGIT_FLOATS // vocab rows, so the logits,
    their log-softmax and their gradient stay bounded whatever the batch and the vocabulary (Gemma-3's
    262k tokens: 64 rows, 64 MiB each)."""
    h = hidden.detach().requires_grad_(True)
    targets = batch.input_ids[:, 1:].to(h.device).reshape(-1)
    total = 0.0
    with torch.enable_grad():
        normed = layerwise.final_hidden_fn(sk, h, batch)[:, :-1]
        rows = normed.detach().reshape(-1, normed.shape[-1])
        grad = torch.zeros_like(rows)
        step = max(1, LOGIT_FLOATS // sk.model.get_output_embeddings().weight.shape[0])
        for s in range(0, rows.shape[0], step):
            part = rows[s:s + step].requires_grad_(True)
            logits = layerwise.logits(sk, part)
            tgt = targets[s:s + step]
            if draw is not None:
                probs = logits.detach().float().softmax(-1)
                tgt = torch.multinomial(probs.cpu(), 1, generator=draw).squeeze(-1).to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
            loss.backward()
            grad[s:s + step] = part.grad
            total += loss.item()
        normed.backward(grad.reshape(normed.shape))
    return h.grad.detach(), total
