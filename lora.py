"""
LoRA for model.py's GPT-2: train a few low-rank adapters instead of every weight ("Build a LLM from scratch"
appendix E; the q/k/v slices of the fused attention layer as litgpt adapts them). Imports only torch and model.py.

    add_lora(gpt, rank=16, alpha=16)      # every weight frozen, adapters on the book's seven targets
    ...train...
    merge_lora(gpt)                       # plain Linears again, computing the same
"""

import math

import torch
import torch.nn as nn

from model import replace_modules

LORA_TARGETS = ("q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "head")  # every Linear (the book's)
LORA_CHOICES = LORA_TARGETS + ("attn.c_attn",)  # attn.c_attn: one adapter on the fused q/k/v layer (as PEFT)


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update: y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T.

    The output may be `parts` equal slices (3 for c_attn: q, k, v), of which `adapted` get an adapter each, as
    litgpt does on a fused q/k/v layer. B starts at zero, so fresh adapters change nothing: step 0 is the base model.
    """

    def __init__(self, linear, rank, alpha, dropout=0.0, parts=1, adapted=(0,)):
        nn.Module.__init__(self)  # not nn.Linear's: keep the existing weight (it may be tied to wte) and bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.scale, self.parts, self.adapted = rank, alpha / rank, parts, tuple(adapted)
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(len(self.adapted) * rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(len(self.adapted), self.out_features // parts, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight (and PEFT A)
        self.lora_dropout = nn.Dropout(dropout)

    def lora_B_full(self):
        """B as one (out_features, adapted * rank) matrix: each adapted slice of rows reads its own rank columns."""
        if self.parts == 1:
            return self.lora_B[0]
        full = self.lora_B.new_zeros(self.parts, self.out_features // self.parts, len(self.adapted) * self.rank)
        for i, part in enumerate(self.adapted):
            full[part, :, i * self.rank:(i + 1) * self.rank] = self.lora_B[i]
        return full.view(self.out_features, -1)

    def forward(self, x):
        return super().forward(x) + (self.lora_dropout(x) @ self.lora_A.t()) @ self.lora_B_full().t() * self.scale

    def merged(self):
        """A plain nn.Linear computing the same: W + (alpha / rank) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            delta = (self.lora_B_full().float() @ self.lora_A.float()) * self.scale
            linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        linear.bias = self.bias
        return linear


def add_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS, head="lm_head"):
    """Freeze every parameter of model (a GPT, or a module holding one) and give the targets trainable adapters.

    targets: q, k, v (each its own adapter on a slice of the fused attn.c_attn) or attn.c_attn (one adapter on it
    all), attn.c_proj, mlp.c_fc, mlp.c_proj, head (the Linear named by `head`: lm_head, or a classifier's own).
    Returns model.
    """
    targets = check_lora_targets(targets)
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be at least 1")
    qkv = tuple(i for i, t in enumerate("qkv") if t in targets)
    whole = [t for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") if t in targets]
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if name.endswith("attn.c_attn") and qkv:
            lora = LoRALinear(module, rank, alpha, dropout, parts=3, adapted=qkv)
        elif any(name.endswith(t) for t in whole) or ("head" in targets and name == head):
            lora = LoRALinear(module, rank, alpha, dropout)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, lora)
    return model


def check_lora_targets(targets):
    """targets as a set, or a ValueError saying what is wrong with them."""
    targets = set(targets)
    if unknown := targets - set(LORA_CHOICES):
        raise ValueError(f"unknown LoRA target(s) {', '.join(sorted(unknown))}: choose from {', '.join(LORA_CHOICES)}")
    if not targets:
        raise ValueError(f"no LoRA targets: choose from {', '.join(LORA_CHOICES)}")
    if targets & {"q", "k", "v"} and "attn.c_attn" in targets:
        raise ValueError("LoRA targets q/k/v and attn.c_attn both adapt the fused attention input: choose one")
    return targets


def merge_lora(model):
    """Fold every adapter into its weight: the same outputs from plain Linears, all parameters trainable again.
    A merged lm_head has its own weight, no longer tied to wte. Returns model."""
    replace_modules(model, LoRALinear, LoRALinear.merged)
    return model.requires_grad_(True)
