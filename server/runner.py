"""ModelRunner: the two forwards of an engine step (batched decode, packed prefill) on a stock transformers
causal LM, through the slot KV cache, with explicit position ids and masks: the lean step (decoder.py) for
the architectures it takes, both forwards; else the transformers forward.

Masks follow the model's attention: one boolean [.., q, k] mask for sdpa (additive floats for eager), a
dict keyed by layer type for models that mix sliding and full attention (Gemma 3), the window applied
where the config has one.
"""

from __future__ import annotations

import inspect

import torch

from . import graphs
from .decoder import Decoder, recipe_of
from .kv_cache import DecodeView, PrefillView, SlotKVCache, additive


class ModelRunner:
    def __init__(self, model, kv: SlotKVCache, lean_decode: bool = True, cuda_graphs: bool = True) -> None:
        self.model = model
        self.kv = kv
        cfg = model.config
        tc = getattr(cfg, "get_text_config", lambda: cfg)()
        types = list(getattr(tc, "layer_types", None) or [])
        window = getattr(tc, "sliding_window", None)
        if types:
            # models with layer types take a dict of masks when any layer slides, else one mask
            self.mask_types = sorted(set(types)) if "sliding_attention" in types else None
            self.window = window if "sliding_attention" in types else None
        else:
            self.mask_types, self.window = None, window
        self.additive = getattr(cfg, "_attn_implementation", "sdpa") == "eager"
        recipe = recipe_of(model) if lean_decode else None
        # else the transformers forward
        self.decoder = Decoder(model, recipe, self._windows(types, tc.num_hidden_layers)) if recipe is not None else None
        # on CUDA, the lean step replayed from graphs (graphs.py) where every layer's weights stay in place
        self.static = None
        if cuda_graphs and self.decoder is not None and kv.shape.device.type == "cuda" and graphs.usable(model)[0]:
            self.static = graphs.StaticDecode(self.decoder, self._masks, kv)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.dtype = next(model.parameters()).dtype

    def _windows(self, types: list[str], layers: int) -> list[int | None]:
        """Each layer's attention window, the one its mask (_masks) applies."""
        if self.mask_types is None:
            return [self.window] * layers
        return [self.window if t == "sliding_attention" else None for t in types]

    def _masks(self, view: DecodeView | PrefillView):
        def one(window):
            m = view.mask(window)
            return additive(m, self.dtype) if self.additive else m

        if self.mask_types is None:
            return one(self.window)
        return {t: one(self.window if t == "sliding_attention" else None) for t in self.mask_types}

    @torch.inference_mode()
    def decode(self, tokens: list[int], lens: list[int]) -> torch.Tensor:
        """Running rows [0, R): feed tokens[r] at position lens[r]. Returns logits [R, V]."""
        if self.static is not None and self.static.fits(len(tokens)):
            return self.static.decode(tokens, lens)
        view = self.kv.decode_view(lens)
        if self.decoder is not None:
            return self.decoder.decode(torch.tensor(tokens, device=self.kv.shape.device), view, self._masks(view))
        ids = torch.tensor(tokens, device=self.kv.shape.device).unsqueeze(1)  # [R, 1]
        out = self.model(input_ids=ids, attention_mask=self._masks(view), position_ids=view.position_ids(),
                         use_cache=True, **{self.cache_kw: view})
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, segments: list[tuple[int, int, int]], tokens: list[int], keep: list[int]) -> torch.Tensor:
        """Segments (row, offset, length) of `tokens` packed in one input row; logits [len(keep), V] at
        the packed positions `keep`."""
        view = self.kv.prefill_view(segments)
        dev = self.kv.shape.device
        ids = torch.tensor(tokens, device=dev).unsqueeze(0)  # [1, T]
        keep_t = torch.tensor(keep or [len(tokens) - 1], device=dev)
        if self.decoder is not None:
            return self.decoder.prefill(ids, view, self._masks(view), keep_t)
        out = self.model(input_ids=ids, attention_mask=self._masks(view), position_ids=view.position_ids(),
                         use_cache=True, logits_to_keep=keep_t, **{self.cache_kw: view})
        return out.logits[0]
