"""
GPT-2 in one file of plain PyTorch: the model, a KV cache and generation, int8 weights and LoRA adapters.

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
        dropout = self.dropout if self.training else 0.0
        if self.training and pos is None and x.device.type == "cpu" and T <= 512:
            y = attention_by_matmul(q, k, v, mask, dropout)
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
    forward and backward as these batched matmuls (bench.py --what=train), and the (T, T) weights stay small.
    """
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if mask is None:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return F.dropout(att, dropout, training=dropout > 0) @ v


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

    decode_step = None  # next_logits compiled for one token at a time, once compile_decode() has run

    def setup_cache(self, batch_size, max_len, dtype=None):
        """Get ready to generate: a KV cache in every layer for batch_size sequences of up to max_len tokens,
        and, for float32 weights on the CPU, Linears that multiply a few rows at memory speed (RowsLinear)."""
        self.clear_cache()
        if self.decode_step is not None:  # one cache size for every call, so the compiled step compiles once
            max_len = self.config.block_size
        dtype = dtype or self.wte.weight.dtype
        head_dim = self.config.n_embd // self.config.n_head
        for block in self.h:
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_head, head_dim, dtype,
                                          self.wte.weight.device)
        if self.wte.weight.device.type == "cpu" and self.wte.weight.dtype == torch.float32:
            replace_modules(self, nn.Linear, RowsLinear)

    def clear_cache(self):
        for block in self.h:
            block.attn.kv_cache = None
        replace_modules(self, RowsLinear, lambda m: m.linear)

    def next_logits(self, idx, pos=None, valid=None):
        """Logits (B, vocab) of the token that follows idx (B, T); pos and valid as in hidden_states."""
        return self.lm_head(self.hidden_states(idx, pos, valid)[:, -1, :])  # only the last position is needed

    def compile_decode(self):
        """Compile the one-token decode step with torch.compile; generation uses it from then on. The first
        call compiles (10-60 s); dynamic=True: one graph serves every position past 1 and every batch size past 1."""
        self.decode_step = torch.compile(self.next_logits, dynamic=True)

    def quantize_int8(self):
        """Weight-only int8 for generation: every Linear, lm_head included, becomes an Int8Linear (wte stays as
        it is for the embedding lookup). Irreversible, and for inference only; returns the model in eval mode."""
        if any(isinstance(m, LoRALinear) for m in self.modules()):
            raise ValueError("merge the LoRA adapters into the weights (merge_lora) before quantizing to int8")
        replace_modules(self, nn.Linear, Int8Linear)
        return self.eval()

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
    """Put make(m) in place of every submodule m whose type is exactly kind."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child))


class RowsLinear(nn.Module):
    """A float32 nn.Linear (wrapped, weights shared) that is fast for the few rows of a decode step on the CPU.

    Decoding reads every weight once per token, so it is bound by memory bandwidth; but MKL multiplies a few rows
    by a matrix on one core, at ~12 GB/s where the memory gives ~40 (bench.py, 2-core AMD EPYC). Cut into slices
    of output rows and multiplied as one batched product (bmm), the weights are read by every core: ~2x faster.
    """
    max_rows = 16  # more rows (a prefill) have enough work for MKL's own threading

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        # the most slices of equal size up to 32: 768 -> 32, 2304 -> 32, GPT-2's vocab 50257 -> 29 (x 1733)
        self.splits = next(s for s in range(32, 0, -1) if linear.out_features % s == 0)

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1))
        if rows.size(0) > self.max_rows or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return self.linear(x)
        w = self.linear.weight.view(self.splits, -1, rows.size(1))  # (splits, out / splits, in): a view
        y = torch.bmm(w, rows.t().expand(self.splits, -1, -1))  # (splits, out / splits, rows)
        y = y.reshape(-1, rows.size(0)).t().reshape(*x.shape[:-1], -1)
        return y if self.linear.bias is None else y + self.linear.bias


# ----- LoRA: fine-tune a few low-rank adapters instead of every weight -----

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


def add_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Freeze every parameter of model (a GPT, or a module holding one) and give the targets trainable adapters.

    targets: q, k, v (each its own adapter on a slice of the fused attn.c_attn) or attn.c_attn (one adapter on it
    all), attn.c_proj, mlp.c_fc, mlp.c_proj, head (model.head where there is one, as in a classifier; else
    lm_head). Returns model.
    """
    targets = check_lora_targets(targets)
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be at least 1")
    qkv = tuple(i for i, t in enumerate("qkv") if t in targets)
    whole = [t for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") if t in targets]
    head = "head" if hasattr(model, "head") else "lm_head"  # the output layer: a classifier's, or the LM's
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


class Int8Linear(nn.Module):
    """A Linear with int8 weights and one scale per output row (symmetric, weight-only quantization).

    A decode step reads every weight once, so 1 byte per weight instead of 4 is up to 4x less time. On the CPU
    torch._weight_int8pack_mm (the kernel gpt-fast uses) multiplies bf16 activations by the int8 weights.
    """

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        # each row's largest weight becomes +-127; rounding with the stored (bf16) scale keeps every weight within
        # half a step of its int8 value: |w - q * scale| <= scale / 2
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        self.register_buffer("weight", torch.round(w / scales.float()[:, None]).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x):
        if self.training:
            raise RuntimeError("this model's Linear layers are quantized to int8 (quantize_int8), which is for "
                               "generation only: int8 weights cannot be trained. Fine-tune the float model (LoRA "
                               "keeps the memory low: lora_rank=16) and quantize the result.")
        if x.device.type == "cpu":
            rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales).to(x.dtype).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None].to(x.dtype), self.bias)  # dequantized
