"""A transformers causal LM with no weights, filled one part at a time from checkpoint-named tensors.

The model is built under accelerate's `init_empty_weights` (parameters on the meta device, buffers such
as rotary frequencies real), so building it costs nothing whatever its size. Checkpoint names are mapped
to module parameters by transformers' own loading conversions (e.g. per-expert MoE weights fused into
3-D stacks), so any architecture transformers can load from safetensors loads here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)


class Skeleton:
    def __init__(self, config_dir: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        self.config = AutoConfig.from_pretrained(str(config_dir))
        self.dtype = dtype
        self.device = torch.device(device)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        if self.device.type != "cpu":  # buffers only: parameters stay on meta until loaded
            for mod in self.model.modules():
                for name, b in mod._buffers.items():
                    if b is not None:
                        mod._buffers[name] = b.to(self.device)
        self.layers = find_layers(self.model)
        self._mapping = get_model_conversion_mapping(self.model)

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Attach checkpoint-named tensors (any subset) to the model, cast to the compute dtype/device."""
        sd = {k: v.to(device=self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
              for k, v in state_dict.items()}
        quiet = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its per-call "Loading weights" bar would print once per layer
        try:
            cfg = LoadStateDictConfig(weight_mapping=self._mapping, device_map={"": self.device}, dtype=self.dtype)
            convert_and_load_state_dict_in_model(self.model, sd, cfg)
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
        if getattr(self.model.config, "tie_word_embeddings", False) or _text_cfg(self.model.config).get("tie_word_embeddings"):
            out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
            # (a head computed from an 8-bit copy, qhead.py, is a QuantLinear: it has no weight to tie)
            if getattr(out, "weight", None) is not None and out.weight.device.type == "meta" and inp.weight.device.type != "meta":
                out.weight = inp.weight
        # weights are constants here: calibration differentiates w.r.t. activations only, and a parameter
        # that required grad would make every backward also build its weight gradient (a 262k-token
        # head's alone is 0.7 GB in fp32)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def unload_layer(self, index: int) -> None:
        """Drop a layer's weights back to the meta device (frees them)."""
        self.layers[index].to("meta")

    def missing(self, prefix: str = "") -> list[str]:
        return [n for n, p in self.model.named_parameters() if n.startswith(prefix) and p.device.type == "meta"]


def find_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers: the longest ModuleList whose name ends in 'layers'."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list ('*.layers') found")
    return best


def _text_cfg(config) -> dict:
    tc = getattr(config, "text_config", None)
    return tc.to_dict() if tc is not None else {}
