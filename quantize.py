"""
Fast generation for model.py's GPT-2, from the outside (as gpt-fast keeps quantize.py beside model.py): int8
weights, and the float32 decode kernel that is fastest on the CPU at hand. Imports only torch and model.py.

    ready_for_generation(gpt, quantize="int8", compile=True)   # what sample.py does with --quantize / --compile
"""

import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import replace_modules


def ready_for_generation(gpt, quantize="none", compile=False, rows=1):
    """The model as sample.py runs it (bench.py measures the same): int8 weights if asked for, else on the CPU
    in float32 the decode kernel measured fastest here for decode steps of `rows` rows; the one-token decode step
    compiled if asked for."""
    if quantize == "int8":
        quantize_int8(gpt)
    else:
        choose_decode_kernel(gpt, rows)
    if compile:
        gpt.compile_decode()
    return gpt


def model_bytes(gpt):
    """Memory the model's weights take: every parameter and buffer, tied tensors once."""
    tensors = {id(t): t for t in [*gpt.parameters(), *gpt.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- int8 weights

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


def quantize_int8(gpt):
    """Weight-only int8 for generation: every Linear, lm_head included, becomes an Int8Linear (wte stays as it is
    for the embedding lookup). Irreversible, and for inference only; returns the model in eval mode."""
    if any(".lora_" in name for name, _ in gpt.named_parameters()):
        raise ValueError("merge the LoRA adapters into the weights (merge_lora) before quantizing to int8")
    replace_modules(gpt, RowsLinear, plain_linear)
    replace_modules(gpt, nn.Linear, Int8Linear)
    return gpt.eval()


# ----------------------------------------------------------------------------- the float32 decode kernel

class RowsLinear(nn.Linear):
    """An nn.Linear (the same weight and bias, so a tied lm_head stays tied) that multiplies the few rows of a
    float32 decode step by slices of its weight as one batched product (bmm).

    Decoding reads every weight once per token, so it is bound by memory bandwidth. Some BLAS libraries multiply
    a single row by a matrix on one core (MKL on a 2-core AMD EPYC: ~12 GB/s where the memory gives ~40); cut into
    slices, the weights are read by every core, ~2x faster there. Its products of a few rows are slow there too
    (gpt2's lm_head on 8 rows: 24.9 ms with F.linear, 14.0 in slices; on 32 rows: 41.6 and 24.4). On other CPUs
    it is slower than plain F.linear, which is why choose_decode_kernel measures before it keeps it.
    """
    max_rows = 32  # more rows (a prefill) have enough work for the BLAS's own threading

    def __init__(self, linear):
        nn.Module.__init__(self)  # not nn.Linear's: share the existing weight and bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        # the most slices of equal size up to 32: 768 -> 32, 2304 -> 32, GPT-2's vocab 50257 -> 29 (x 1733)
        self.splits = next(s for s in range(32, 0, -1) if self.out_features % s == 0)

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1))
        if (rows.size(0) > self.max_rows or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        w = self.weight.view(self.splits, -1, rows.size(1))  # (splits, out / splits, in): a view
        if rows.size(0) == 1:  # each slice times the row: (splits, out / splits, 1)
            y = torch.bmm(w, rows.t().expand(self.splits, -1, -1)).view(1, -1)
        else:  # the rows times each slice: (splits, rows, out / splits), 1.4-1.8x faster from 2 rows on (EPYC)
            y = torch.bmm(rows.expand(self.splits, -1, -1), w.transpose(1, 2))
            y = y.transpose(0, 1).reshape(rows.size(0), -1)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def plain_linear(m):
    """An nn.Linear sharing m's weight and bias."""
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    linear.weight, linear.bias = m.weight, m.bias
    return linear


KERNELS = {"linear": plain_linear, "rows": RowsLinear}  # name -> how to make one Linear use it
chosen = {}  # (model shapes, threads, rows) -> (kernel name, {name: ms per decode step}): measured once per process


def choose_decode_kernel(gpt, rows=1, steps=6):
    """Measure which Linear kernel decodes fastest for this model's shapes on this machine (a few real decode
    steps of `rows` rows with each, interleaved, the best step of each counted) and use it. Only float32 on the
    CPU has a choice. Returns (name, {name: ms per step}); the measurement is kept for the rest of the process."""
    weight = gpt.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or rows > RowsLinear.max_rows:
        return "linear", {}  # (more rows than RowsLinear takes: it runs F.linear itself)
    c = gpt.config
    key = (c.n_layer, c.n_embd, c.vocab_size, torch.get_num_threads(), rows)
    if key not in chosen:
        timings = {name: float("inf") for name in KERNELS}
        idx = torch.zeros(rows, 8, dtype=torch.long)
        with torch.no_grad():
            gpt.setup_cache(rows, 8 + steps)
            try:
                gpt.next_logits(idx, 0)
                for pos in range(8, 8 + steps):
                    for name, make in KERNELS.items():  # interleaved: a busy moment hits every kernel
                        use_kernel(gpt, make)
                        start = time.perf_counter()
                        gpt.next_logits(idx[:, :1], pos)
                        timings[name] = min(timings[name], (time.perf_counter() - start) * 1000)
            finally:
                gpt.clear_cache()
        # plain F.linear unless another is clearly faster: never slower than nn.Linear
        best = min(timings, key=timings.get)
        chosen[key] = (best if timings[best] < 0.97 * timings["linear"] else "linear", timings)
    use_kernel(gpt, KERNELS[chosen[key][0]])
    return chosen[key]


def kernel_line(kernel, timings, rows=1):
    """choose_decode_kernel's choice and its timings, in words."""
    return (f"float32 decode kernel '{kernel}', chosen by timing a decode step of {rows} row{'s' * (rows > 1)} with "
            f"each: {', '.join(f'{name} {ms:.1f} ms' for name, ms in timings.items())}")


def use_kernel(gpt, make):
    """Every float Linear of gpt computed by make(linear)'s kind; the weights stay the same tensors."""
    for kind in (nn.Linear, *(k for k in KERNELS.values() if isinstance(k, type))):
        replace_modules(gpt, kind, make)
    return gpt
