"""
Using a trained GPT-2 for text: which device, prompts in a checkpoint's template (a chat folded into it), prompts
cut to the context, batches of prompts left-padded so each row gets what it would get alone, and text streamed as
whole UTF-8 characters that stops at a stop string. sample.py, serve.py, finetune.py (its sample answers and
test_responses.json) and the scripts after them use these.

    answers = answer(gpt, [enc.encode_ordinary(p) for p in prompts], max_new_tokens=64)   # greedy, batched
    sums, counts = target_logprobs(gpt, x, y)       # log-likelihood of given text (evaluate.py's loss, HellaSwag)
"""

import codecs
import os
import platform
import re
import sys
import time
from contextlib import nullcontext

import torch

from data import ALPACA_TEMPLATE, EOT, IGNORE, format_prompt


def pick_device(name):
    """The device a setting names; auto: CUDA (this process's GPU under torchrun), else MPS, else the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def device_problem(name):
    """What is wrong with a device setting on this machine, or None."""
    if name in ("auto", "cpu"):
        return None
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            return f"device='{name}' but torch finds no CUDA GPU here: use device=cpu (or auto)"
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            return f"device='{name}' but there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)"
        return None
    if name == "mps":
        return None if torch.backends.mps.is_available() else "device='mps' but this is no Mac with MPS: use cpu"
    return f"device='{name}' is not one this project runs on: auto, cpu, cuda, cuda:N or mps"


def weights_dtype(name, device_type):
    """The dtype of the weights for generation. auto is float32 on the CPU: GPT-2's own numbers, and about as
    fast as bf16 there (bench.py); quantize=int8 is the fast setting."""
    if name != "auto":
        return getattr(torch, name)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device_type == "mps" else torch.float32


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def fit_context(ids, block_size, max_new_tokens, tell=warn):
    """Cut a prompt from the left so that max_new_tokens still fit in the context, though never to less than
    half of it (a KV cache holds the whole sequence: the window cannot slide). tell(message) says what was cut."""
    room = block_size - min(max_new_tokens, block_size // 2)
    if len(ids) > room:
        tell(f"the prompt is {len(ids)} tokens: only its last {room} are kept, so that max_new_tokens="
             f"{max_new_tokens} fit in the {block_size}-token context")
        ids = ids[-room:]
    return ids


def template_of(setting, saved):
    """The prompt template (a dict, see data.ALPACA_TEMPLATE) to wrap prompts in, or None: the checkpoint's own
    (saved) for auto."""
    return {"none": None, "alpaca": ALPACA_TEMPLATE}.get(setting, saved)


def apply_template(text, template, input_text=""):
    """text as the instruction of template (with input_text as its Input, if any); as it is where template is None."""
    return text if template is None else format_prompt(text, input_text, template)


def chat_ids(enc, messages, template):
    """The token ids of a conversation ({"role", "content"} dicts, oldest first), folded into one prompt the way
    the model was trained to answer: each user message wrapped in the prompt template (as an instruction), each
    assistant message its answer closed by <|endoftext|> (where the model stopped); a system message is plain text
    and a blank line before the turns that follow it. The model answers after the last user message.

    An assistant's content may be token ids (sample.py --chat keeps the ids it generated, never re-tokenized)."""
    ids = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            ids += (content if isinstance(content, list) else enc.encode_ordinary(content)) + [EOT]
        elif role == "user":
            ids += enc.encode_ordinary(apply_template(content, template))
        else:
            ids += enc.encode_ordinary(content + "\n\n")
    return ids


def left_pad(prompts, device):
    """(idx, valid) for prompts (lists of ids) of different lengths: padded on the left with <|endoftext|>,
    valid False on the padding, so that model.generate gives each row what it gives that prompt alone."""
    width = max(map(len, prompts))
    idx = torch.tensor([[EOT] * (width - len(p)) + list(p) for p in prompts], device=device)
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    return idx, valid


def until_eot(row):
    """A row of new token ids up to (not including) its first <|endoftext|>."""
    return row[:row.index(EOT)] if EOT in row else row


ANSWER_KV_BYTES = 1 << 30  # answer batches: as many rows as a KV cache of this size holds, at most 32


def answer_batch_size(model, longest, max_new_tokens, most=32):
    """Rows per answer batch for prompts of up to `longest` tokens. A decode step reads every weight once however
    many rows it has, so rows are nearly free until the arithmetic catches up (gpt2, 64 answers of 64 tokens on
    2 CPU cores: 19.0 s in batches of 8, 8.4 s in batches of 32); the KV cache, which grows with them, bounds them."""
    c = model.config
    length = c.block_size if getattr(model, "decode_step", None) else min(c.block_size, longest + max_new_tokens)
    per_row = 2 * c.n_layer * length * c.n_embd * model.wte.weight.element_size()
    return max(1, min(most, ANSWER_KV_BYTES // per_row))


@torch.no_grad()
def answer(model, prompts, max_new_tokens, ctx=None, batch_size=None, what="answers", progress=None):
    """Greedy answers (token lists, without the end-of-text) to prompts (token lists), in their order. Prompts of
    similar length are batched together (batch_size rows; by default answer_batch_size's), left-padded (a
    batch's greedy outputs equal each prompt's alone), and a batch ends as soon as all its answers have. ctx: an
    autocast context, if any. Long work shows progress (progress: the caller's Progress instead of one of its own)."""
    was_training = model.training
    model.eval()
    batch_size = batch_size or answer_batch_size(model, max(map(len, prompts), default=1), max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding, and similar answers
    answers, progress = [None] * len(prompts), progress or Progress(what, len(prompts), "prompts")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        idx, valid = left_pad([list(prompts[i][-(model.config.block_size - 1):]) for i in batch], model.wte.weight.device)
        with ctx or nullcontext():
            out = model.generate(idx, max_new_tokens, temperature=0, eos_id=EOT, valid=valid)
        for i, row in zip(batch, out[:, idx.size(1):].tolist()):
            answers[i] = until_eot(row)
        progress.update(len(batch))
    model.train(was_training)
    return answers


class Progress:
    """'what: done/total unit (pct) | rate | ETA' on stderr for long work: in place on a terminal, a line every
    5 s in a log; nothing for work that ends within its first `quiet` seconds (0: a line at the end, always)."""

    def __init__(self, what, total, unit="examples", quiet=2.0):
        self.what, self.total, self.unit, self.done, self.tty = what, total, unit, 0, sys.stderr.isatty()
        self.start = self.shown = time.time()
        self.printed, self.quiet = False, quiet

    def update(self, n=1):
        self.done += n
        now, end = time.time(), self.done >= self.total
        if now - self.start < self.quiet and not (end and self.printed):
            return
        if not end and now - self.shown < (0.5 if self.tty else 5) and self.printed:
            return
        elapsed = now - self.start
        when = f"done in {clock(elapsed)}" if end else f"ETA {clock(elapsed * (self.total - self.done) / self.done)}"
        line = (f"{self.what}: {self.done}/{self.total}{' ' + self.unit if self.unit else ''} "
                f"({100 * self.done / max(self.total, 1):.0f}%) | {self.done / max(elapsed, 1e-9):.2f}/s | {when}")
        if self.tty:  # in place: back to the start of the line, and erase what a longer line left there
            print("\r" + line + "\033[K", end="\n" if end else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        self.shown, self.printed = now, True


def clock(seconds):
    """Seconds as '3m07s'."""
    return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"


def cpu_name():
    """The CPU's model name and core count, for every speed report (Linux; else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


class TextStream:
    """Prints tokens as text the moment it is safe: only whole UTF-8 characters (a character can span tokens),
    and nothing that may be the start of a stop string until it is known not to be."""

    def __init__(self, enc, stops=(), out=None):
        self.enc, self.stops, self.out = enc, stops, sys.stdout if out is None else out
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet printed

    def add(self, token):
        """Print what token completes; True when a stop string is complete (the text ends before it)."""
        self.pending += self.utf8.decode(self.enc.decode_single_token_bytes(token))
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.pending = self.pending[:min(found)]
            return True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        self.write(self.pending[:len(self.pending) - held])
        self.pending = self.pending[len(self.pending) - held:]
        return False

    def finish(self):
        self.write(self.pending + self.utf8.decode(b"", final=True))
        self.pending = ""

    def write(self, text):
        self.out.write(text)
        self.out.flush()


def cut_at_stops(text, stops):
    """text up to the first of the stop strings in it."""
    return text[:min([i for i in map(text.find, stops) if i >= 0], default=len(text))]



@torch.no_grad()
def target_logprobs(model, idx, targets, ctx=None):
    """(sum, count): per row of idx (B, T), the summed log-probability of its targets (B, T; the next tokens,
    IGNORE where nothing is scored) and how many were scored. The head runs on the scored positions only:
    a (B, T, 50257) logits tensor is never made, and the head's output is taken 64 rows at a time, so each piece
    stays in the cache (~3x faster on the CPU than all at once: 2,400 x 50,257 logits). ctx: an autocast
    context, if any."""
    was_training = model.training
    model.eval()
    scored = targets != IGNORE
    with ctx or nullcontext():
        hidden, wanted = model.hidden_states(idx)[scored], targets[scored]
        logp = torch.cat([torch.log_softmax(model.lm_head(h).float(), dim=-1).gather(1, t[:, None])[:, 0]
                          for h, t in zip(hidden.split(64), wanted.split(64))] or [hidden.new_zeros(0).float()])
    rows = torch.arange(idx.size(0), device=idx.device)[:, None].expand_as(targets)[scored]
    sums = torch.zeros(idx.size(0), dtype=torch.float64, device=idx.device).index_add_(0, rows, logp.double())
    model.train(was_training)
    return sums.tolist(), scored.sum(1).tolist()
