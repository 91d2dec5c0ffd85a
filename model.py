"""
GPT-2 in one file of plain PyTorch: the model, a KV cache and generation.

It gives the same logits as OpenAI's GPT-2 (and Hugging Face's GPT2LMHeadModel) for the same weights, so
the names below follow GPT-2's own (wte, wpe, h, ln_1, attn.c_attn, ...) and loading weights is a table.
This file imports only torch: copy it into your own project as it is.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (GPT-2's n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 model '{name}': choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated once for the longest sequence."""

    def __init__(self, batch_size, max_len, n_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        end = pos + k.size(2)
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache = None  # set by GPT.setup_cache for generation

    def forward(self, x, mask=None, pos=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if pos is not None:
            k, v = self.kv_cache.update(pos, k, v)
        # with no mask, queries and keys are the same positions, so plain causal masking is right,
        # except for a single new token, which may see every key in the cache
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation; the exact erf GELU drifts ~5e-4 from the reference logits
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, pos=None):
        x = x + self.attn(self.ln_1(x), mask, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.grad_checkpoint = False  # trade compute for memory in training (finetune.py --grad_checkpoint)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two residual adds per block
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self):
        # the output projection is the token embedding, as in GPT-2 (call again after replacing wte)
        self.lm_head.weight = self.wte.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        """Parameters counted once (lm_head shares wte); non_embedding also leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def hidden_states(self, idx, pos=None, valid=None):
        """The final (B, T, n_embd) hidden states after ln_f.

        pos: None for a plain forward; an int to run through the KV cache with idx at positions pos...
        valid: optional (B, pos + T) bool, False where a row is left padding (batched generation).
        """
        B, T = idx.size()
        start = 0 if pos is None else pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context "
                             f"(block_size={self.config.block_size})")
        if valid is None:
            positions = torch.arange(start, start + T, device=idx.device)
        else:  # each row counts positions from its first real token, so padding does not shift them
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
        mask = self._attention_mask(T, start, valid, idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            if self.grad_checkpoint and self.training:  # keep only block inputs; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(block, x, mask, pos, use_reentrant=False)
            else:
                x = block(x, mask, pos)
        return self.ln_f(x)

    def _attention_mask(self, T, start, valid, device):
        """None where SDPA's own causal flag is right; else a bool mask (True = may attend)."""
        if valid is None and (start == 0 or T == 1):
            return None
        keys = torch.arange(start + T, device=device)
        queries = torch.arange(start, start + T, device=device)
        mask = keys[None, :] <= queries[:, None]  # (T, start + T)
        if valid is not None:
            # never attend to padding, but let every query see itself so no row is all-masked (NaN)
            mask = mask & (valid[:, None, None, :] | (keys[None, :] == queries[:, None]))
        return mask

    def forward(self, idx, targets=None, pos=None, valid=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        targets (B, T) are the already-shifted next tokens; -100 marks positions that carry no loss.
        """
        logits = self.lm_head(self.hidden_states(idx, pos, valid))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    def optim_groups(self, weight_decay):
        """AdamW parameter groups: weight decay on matrices, none on biases, LayerNorms and embeddings
        of size one (every parameter that is a vector). Frozen parameters are left out."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()  # tied once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # ----- generation -----

    def setup_cache(self, batch_size, max_len, dtype=None):
        """Allocate a KV cache in every layer for batch_size sequences of up to max_len tokens."""
        dtype = dtype or self.wte.weight.dtype
        head_dim = self.config.n_embd // self.config.n_head
        for block in self.h:
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_head, head_dim, dtype,
                                          self.wte.weight.device)

    def clear_cache(self):
        for block in self.h:
            block.attn.kv_cache = None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, valid=None, generator=None):
        """Continue idx (B, T) by up to max_new_tokens tokens; returns the prompt followed by them.

        temperature=0 is greedy. With eos_id, a row stops at its end-of-text token (later tokens of a
        finished row are eos_id) and generation ends when every row has stopped. valid (B, T) marks real
        tokens of left-padded prompts. use_cache=False recomputes the whole sequence every step.
        """
        T = idx.size(1)
        max_new_tokens = min(max_new_tokens, self.config.block_size - T)
        if use_cache:
            self.setup_cache(idx.size(0), T + max_new_tokens)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        try:
            pos, step_input = 0, idx
            for _ in range(max_new_tokens):
                if use_cache:
                    hidden = self.hidden_states(step_input, pos, valid)
                    pos += step_input.size(1)
                else:
                    hidden = self.hidden_states(idx, None, valid)
                logits = self.lm_head(hidden[:, -1, :])  # only the last position picks the next token
                next_id = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                    finished |= next_id == eos_id
                idx = torch.cat([idx, next_id[:, None]], dim=1)
                if valid is not None:
                    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
                step_input = next_id[:, None]
                if eos_id is not None and finished.all():
                    break
        finally:
            if use_cache:
                self.clear_cache()
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token id for each row of logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top_k and outside the smallest set whose probability >= top_p."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the most likely always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
