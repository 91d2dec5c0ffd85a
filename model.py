"""
GPT-2 in one file of plain PyTorch: the model, a KV cache, generation and sampling.

It gives the same logits as OpenAI's GPT-2 (and Hugging Face's GPT2LMHeadModel) for the same weights, so
the names below follow GPT-2's own (wte, wpe, h, ln_1, attn.c_attn, ...) and loading weights is a table.
This file imports only torch: copy it into your own project as it is. LoRA adapters (lora.py) and int8
weights (quantize.py) sit beside it and swap its Linear layers from the outside.
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
        dropout = self.dropout if self.training else 0.0
        if self.training and pos is None and x.device.type == "cpu" and T <= 512:
            y = attention_by_matmul(q, k, v, mask, dropout)
        elif pos is not None and T == 1:
            y = decode_attention(q, k, v, mask)
        else:
            # with no mask, queries and keys are the same positions, so plain causal masking is right,
            # except for a single new token, which may see every key in the cache
            is_causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attention_by_matmul(q, k, v, mask=None, dropout=0.0):
    """What F.scaled_dot_product_attention computes (causal where mask is None; queries and keys the same
    positions), as plain matmuls. Under bf16 autocast the attention weights stay in bf16 (SDPA keeps fp32).

    For training on the CPU: up to 512 tokens, PyTorch's CPU flash-attention kernel takes twice as long for
    forward and backward as these batched matmuls (bench_train.py), and the (T, T) weights stay small.
    The mask is added as 0 / -inf inside the q k^T product (baddbmm, scale included): one op where a scale and
    a masked_fill would each pass over the weights twice, forward and backward (~2 ms a layer at 4 x 256).
    """
    B, H, T, D = q.shape
    S = k.size(-2)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    bias = bias.expand(B, H, T, S).reshape(B * H, T, S)  # a view when the mask is the same for every row
    att = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2), alpha=1 / math.sqrt(D))
    att = F.dropout(att.softmax(dim=-1), dropout, training=dropout > 0)
    return (att @ v.reshape(B * H, S, D)).view(B, H, T, D)


def decode_attention(q, k, v, mask=None):
    """One new token per row attending to the KV cache, in the cache's dtype whatever autocast says (the cache holds
    what the weights hold), the mask given as an additive float bias (it is the same attention).

    A decode step's attention reads the whole cache, and with many rows the cache outweighs the weights. On the CPU,
    SDPA's kernel reads a float32 cache faster than it reads the same cache in bf16 (32 rows x 320 keys: 3.0 vs
    8.0 ms a layer, AMD EPYC), and a float mask is faster than a bool one (2.95 vs 3.38 ms).
    """
    with torch.autocast(q.device.type, enabled=False):
        bias = None if mask is None else torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill(
            ~mask, float("-inf"))
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=bias)


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
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)

    def optim_groups(self, weight_decay):
        """AdamW parameter groups: weight decay on matrices, none on biases, LayerNorms and embeddings
        of size one (every parameter that is a vector). Frozen parameters are left out."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()  # tied once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ----- generation -----

    decode_step = None  # next_logits compiled for one token at a time, once compile_decode() has run

    def setup_cache(self, batch_size, max_len):
        """Get ready to generate: a KV cache in every layer for batch_size sequences of up to max_len tokens."""
        self.clear_cache()
        if self.decode_step is not None:  # one cache size for every call, so the compiled step compiles once
            max_len = self.config.block_size
        dtype, head_dim = self.wte.weight.dtype, self.config.n_embd // self.config.n_head
        for block in self.h:
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_head, head_dim, dtype,
                                          self.wte.weight.device)

    def clear_cache(self):
        for block in self.h:
            block.attn.kv_cache = None

    def next_logits(self, idx, pos=None, valid=None):
        """Logits (B, vocab) of the token that follows idx (B, T); pos and valid as in hidden_states."""
        return self.lm_head(self.hidden_states(idx, pos, valid)[:, -1, :])  # only the last position is needed

    def compile_decode(self):
        """Compile the one-token decode step with torch.compile; generation uses it from then on. The first
        call compiles (10-60 s); dynamic=True: one graph serves every position past 1 and every batch size past 1."""
        self.decode_step = torch.compile(self.next_logits, dynamic=True)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """Continue idx (B, T) by up to max_new_tokens tokens; returns the prompt followed by them.
        Takes generate_stream's arguments (temperature, top_k, top_p, eos_id, use_cache, valid, generator)."""
        new = [next_id[:, None] for next_id in self.generate_stream(idx, max_new_tokens, **kwargs)]
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                        use_cache=True, valid=None, generator=None):
        """Continue idx (B, T), yielding each new column of token ids (B,) as soon as it is picked.

        temperature=0 is greedy. With eos_id, a row stops at its end-of-text token (later tokens of a finished row
        are eos_id) and generation ends when every row has stopped. valid (B, T) marks real tokens of left-padded
        prompts. use_cache=False recomputes the whole sequence every step. Leaving the loop early is fine: the
        cache is freed when the generator is closed or collected. One generation at a time per model.
        """
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.config.block_size - T)
        if use_cache:
            self.setup_cache(B, T + max_new_tokens)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        try:
            pos, step_input = 0, idx
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = self.next_logits(idx, None, valid)
                elif pos > 0 and self.decode_step is not None:  # the prompt is prefilled eagerly, once
                    logits = self.decode_step(step_input, pos, valid)
                else:
                    logits = self.next_logits(step_input, pos, valid)
                pos += step_input.size(1)
                next_id = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                    finished |= next_id == eos_id
                if not use_cache:
                    idx = torch.cat([idx, next_id[:, None]], dim=1)
                if valid is not None:
                    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
                step_input = next_id[:, None]
                yield next_id
                if eos_id is not None and finished.all():
                    break
        finally:
            if use_cache:
                self.clear_cache()


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token id for each row of logits (B, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    # inverse-CDF sampling: torch.multinomial's distribution, but ~20x faster over 50k tokens on a CPU (0.04 ms)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.size(-1) - 1).squeeze(-1)


def filter_logits(logits, top_k=None, top_p=None, candidates=256):
    """Set to -inf every logit outside the top_k and outside the smallest set whose probability >= top_p."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # sorting all 50k probabilities takes 3 ms, a fifth of a decode step: sort only the most likely few
        # hundred, which nearly always hold top_p of the probability, and everything only when they do not
        probs = logits.softmax(dim=-1)
        top, order = torch.topk(probs, min(candidates, probs.size(-1)))
        if (top.sum(dim=-1) < top_p).any():
            top, order = torch.sort(probs, descending=True)
        # drop a token when the tokens before it already reach top_p (the most likely always stays)
        drop_sorted = top.cumsum(dim=-1) - top >= top_p
        drop = torch.ones_like(logits, dtype=torch.bool).scatter(-1, order, drop_sorted)  # not a candidate: drop
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def replace_modules(model, kind, make):
    """Put make(m) in place of every submodule m whose type is exactly kind: how lora.py and quantize.py swap
    Linear layers for their own. Returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))
    return model
