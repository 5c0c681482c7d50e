"""Run a causal LM one decoder layer at a time over many sequences (evaluation, calibration).

Whole-model forward needs every layer's weights at once; here only one layer is materialised at a time:
  1. `embed`: run the model with every layer's forward replaced by a recorder. The first records its
     input (the embeddings); each records the keyword arguments its layer is called with (rotary
     position embeddings, the mask for its attention type, ...), so architectures with per-layer
     differences (Gemma-3's sliding/global layers) are driven exactly as the model drives them.
  2. `layer`: apply real layer i (weights loaded by the caller) to the hidden states, with its kwargs.
  3. `head`: run the model again with the last layer's forward returning the final hidden states, and
     catch the input of the output embedding (after the final norm) to compute logits in chunks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ucformat.skeleton import Skeleton


class _Stop(Exception):
    pass


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    layer_kwargs: list[dict] = field(default_factory=list)  # one dict per decoder layer


@contextmanager
def _forwards(layers: torch.nn.ModuleList, make):
    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.inference_mode()
def embed(sk: Skeleton, input_ids: torch.Tensor) -> tuple[torch.Tensor, Batch]:
    """Embeddings [B, T, H] of input_ids and the per-layer kwargs. Needs the non-layer weights loaded."""
    batch = Batch(input_ids=input_ids, layer_kwargs=[{} for _ in sk.layers])
    first: list[torch.Tensor] = []
    last = len(sk.layers) - 1

    def make(i):
        def record(hidden_states, *args, **kwargs):
            if args:
                raise TypeError("decoder layer called with positional arguments; unsupported architecture")
            batch.layer_kwargs[i] = kwargs
            if i == 0:
                first.append(hidden_states)
            if i == last:
                raise _Stop
            return hidden_states
        return record

    with _forwards(sk.layers, make):
        try:
            sk.model(input_ids=input_ids.to(sk.device), use_cache=False)
        except _Stop:
            pass
    return first[0], batch


@torch.inference_mode()
def layer(sk: Skeleton, index: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    out = sk.layers[index](hidden, **batch.layer_kwargs[index])
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def final_hidden(sk: Skeleton, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Input of the output embedding (after the final norm): [B, T, H]."""
    return final_hidden_fn(sk, hidden, batch)


def final_hidden_fn(sk: Skeleton, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """final_hidden under the caller's grad mode (calibration differentiates the loss through it)."""
    last = len(sk.layers) - 1

    def make(i):
        def passthrough(hidden_states, *args, **kwargs):
            return hidden if i == last else hidden_states
        return passthrough

    with _forwards(sk.layers, make):
        return head_input(sk, lambda: sk.model(input_ids=batch.input_ids.to(sk.device), use_cache=False))


def head_input(sk: Skeleton, run) -> torch.Tensor:
    """The input of the output embedding (after the final norm) during `run()`, a forward of sk.model;
    the forward stops there (the head itself never runs)."""
    caught: list[torch.Tensor] = []

    def catch(module, args):
        caught.append(args[0])
        raise _Stop

    handle = sk.model.get_output_embeddings().register_forward_pre_hook(catch)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught[0]


def logits(sk: Skeleton, normed: torch.Tensor) -> torch.Tensor:
    """Logits for normed hidden states [..., H] (applies final logit soft-capping where the model has it)."""
    return softcap(sk, sk.model.get_output_embeddings()(normed).float())


def softcap(sk: Skeleton, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(sk.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits
