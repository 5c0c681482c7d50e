"""Distilled students (`uc distill`, SPEC.md section 8) as transformers causal LMs, registered under
model_type `uc_student` so that every loader of this project (Skeleton, conformance, runtime.load, the
server's transformers forward and its KV cache) builds and runs them from config.json unchanged.

A student reads the teacher's vocabulary at the teacher's width Ht and computes at its own width H:

    e = embed_tokens.proj(embed_tokens.weight[ids])                    [B, T, Ht] -> [B, T, H]
    body: `frr`   one shared Llama decoder block B applied N = scales * iters times; application k
                  (k = s * iters + i) has its own gamma_k, beta_k [H]:
                      h <- h + gamma_k * (B(h) - h) + beta_k
          `dense` N distinct Llama decoder layers (the baseline): h <- B_k(h)
    logits = lm_head.weight @ lm_head.norm(lm_head.proj(model.norm(h)))  [.., H] -> [.., Ht] -> [.., V]
             (with head_rank R: lm_head.u @ (lm_head.v @ ...), u [V, R], v [R, Ht])

`embed_tokens.weight`, `lm_head.norm.weight` and `lm_head.weight` are the teacher's embeddings, final norm
and head (tied to the embeddings where the teacher ties them). Application k attends with its own KV-cache
slot k, so a cache has N layers and a student decodes like any N-layer Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers import initialization as init
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
)

MODEL_TYPE = "uc_student"
KINDS = ("frr", "dense")


@strict
class StudentConfig(LlamaConfig):
    """A Llama config (of the student's body: hidden_size is H, num_hidden_layers is N) plus the student's own
    fields. N is scales * iters for `frr`."""

    model_type = MODEL_TYPE
    student_kind: str = "frr"
    teacher_hidden_size: int = 576
    scales: int = 1
    iters: int = 1
    head_rank: int = 0  # > 0: the head is lm_head.u @ lm_head.v of this rank (untied from the embeddings)

    def validate_architecture(self):
        super().validate_architecture()
        if self.student_kind not in KINDS:
            raise ValueError(f"student_kind {self.student_kind!r}: one of {', '.join(KINDS)}")
        if self.student_kind == "frr" and self.scales * self.iters != self.num_hidden_layers:
            raise ValueError(f"a frr student has scales * iters = {self.scales * self.iters} applications, "
                             f"num_hidden_layers says {self.num_hidden_layers}")
        if self.head_rank < 0 or (self.head_rank and self.tie_word_embeddings):
            raise ValueError(f"head_rank {self.head_rank}: >= 0, and a low-rank head is not tied to the embeddings")


class ProjectedEmbedding(nn.Module):
    """The teacher's token embeddings [V, Ht] and a projection to the student's width."""

    def __init__(self, vocab: int, teacher_hidden: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, teacher_hidden))
        self.proj = nn.Linear(teacher_hidden, hidden, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(F.embedding(ids, self.weight))


class ProjectedHead(nn.Module):
    """Back to the teacher's width, the teacher's final norm, the teacher's head [V, Ht] or, with a rank R, its
    factors u [V, R] and v [R, Ht] (initialised by activation-aware SVD: compressor/lowrank_head.py)."""

    def __init__(self, vocab: int, teacher_hidden: int, hidden: int, eps: float, rank: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, teacher_hidden, bias=False)
        self.norm = LlamaRMSNorm(teacher_hidden, eps=eps)
        if rank:
            self.u = nn.Parameter(torch.empty(vocab, rank))
            self.v = nn.Parameter(torch.empty(rank, teacher_hidden))
        else:
            self.weight = nn.Parameter(torch.empty(vocab, teacher_hidden))
        self.rank = rank

    def teacher_space(self, h: torch.Tensor) -> torch.Tensor:
        """[.., H] -> the head's input [.., Ht] (what the teacher's head reads after its final norm)."""
        return self.norm(self.proj(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.teacher_space(h)
        return F.linear(F.linear(x, self.v), self.u) if self.rank else F.linear(x, self.weight)


class Application(nn.Module):
    """Application k of the shared block: its own gamma/beta and its own KV-cache slot. The block is held
    outside the module tree (it is registered once, as `model.shared`), so a layer's state is gamma and beta
    only and moving or unloading one application never touches the shared weights."""

    def __init__(self, shared: LlamaDecoderLayer, index: int, hidden: int) -> None:
        super().__init__()
        self._shared = (shared,)  # a tuple: not registered as a submodule
        self.index = index
        self.gamma = nn.Parameter(torch.ones(hidden))
        self.beta = nn.Parameter(torch.zeros(hidden))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        block = self._shared[0]
        block.self_attn.layer_idx = self.index  # the cache slot of this application (calls are sequential)
        out = block(hidden_states, **kwargs)
        return hidden_states + self.gamma * (out - hidden_states) + self.beta


class StudentPreTrainedModel(LlamaPreTrainedModel):
    config_class = StudentConfig
    config: StudentConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Application):
            init.ones_(module.gamma)
            init.zeros_(module.beta)
        elif isinstance(module, ProjectedEmbedding) or (isinstance(module, ProjectedHead) and not module.rank):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ProjectedHead):
            init.normal_(module.u, mean=0.0, std=std)
            init.normal_(module.v, mean=0.0, std=std)


class StudentModel(StudentPreTrainedModel, LlamaModel):
    """LlamaModel's forward over a projected embedding and N applications (frr) or N layers (dense)."""

    def __init__(self, config: StudentConfig) -> None:
        StudentPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = ProjectedEmbedding(config.vocab_size, config.teacher_hidden_size, config.hidden_size)
        n = config.num_hidden_layers
        if config.student_kind == "frr":
            self.shared = LlamaDecoderLayer(config, 0)
            self.layers = nn.ModuleList([Application(self.shared, k, config.hidden_size) for k in range(n)])
        else:
            self.layers = nn.ModuleList([LlamaDecoderLayer(config, k) for k in range(n)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class StudentForCausalLM(StudentPreTrainedModel, LlamaForCausalLM):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: StudentConfig) -> None:
        StudentPreTrainedModel.__init__(self, config)
        self.model = StudentModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = ProjectedHead(config.vocab_size, config.teacher_hidden_size, config.hidden_size,
                                     config.rms_norm_eps, config.head_rank)
        self.post_init()


def is_student(config) -> bool:
    return getattr(config, "model_type", None) == MODEL_TYPE


AutoConfig.register(MODEL_TYPE, StudentConfig, exist_ok=True)
AutoModelForCausalLM.register(StudentConfig, StudentForCausalLM, exist_ok=True)
