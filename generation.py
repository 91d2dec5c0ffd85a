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


def prefill_apart(model, prompts, device):
    """Prefill prompts (lists of ids) as a left-padded batch in KV caches of their own, the model's own caches left
    as they were: (the logits of each prompt's next token, the new caches (one a layer), valid). How rows join a
    running batch (answer() here, batching.Engine for serve.py)."""
    running = [block.attn.kv_cache for block in model.h]
    idx, valid = left_pad(prompts, device)
    model.setup_cache(len(prompts), idx.size(1))
    try:
        return model.next_logits(idx, 0, valid), [block.attn.kv_cache for block in model.h], valid
    finally:
        for block, cache in zip(model.h, running):
            block.attn.kv_cache = cache


ANSWER_KV_BYTES = 2 << 30  # answer(): as many rows as a KV cache of this size holds, at most 32


def answer_cache_length(model, longest, max_new_tokens):
    """Columns of answer()'s KV cache: the longest prompt and its answer, and as much again for the answers of rows
    that join while others run (the whole context when the decode step is compiled: it has one cache size)."""
    c = model.config
    if getattr(model, "decode_step", None):
        return c.block_size
    return min(c.block_size, longest + 2 * max_new_tokens)


def answer_batch_size(model, longest, max_new_tokens, most=32):
    """Rows answer() decodes together for prompts of up to `longest` tokens. A decode step reads every weight once
    however many rows it has, so rows are nearly free until the arithmetic catches up (gpt2, 64 answers of 64
    tokens on 2 CPU cores: 19.0 s in batches of 8, 8.4 s in batches of 32); the KV cache, growing with them, bounds
    them."""
    c, length = model.config, answer_cache_length(model, longest, max_new_tokens)
    per_row = 2 * c.n_layer * length * c.n_embd * model.wte.weight.element_size()
    return max(1, min(most, ANSWER_KV_BYTES // per_row))


def answer_rows(model, prompts, max_new_tokens, batch_size=None):
    """The rows answer() decodes together for these prompts (lists of ids): batch_size, else answer_batch_size's
    for the longest (as answer() cuts it to the context), never more than there are prompts (at least one)."""
    longest = max((max(1, min(len(p), model.config.block_size - 1)) for p in prompts), default=1)
    return max(1, min(batch_size or answer_batch_size(model, longest, max_new_tokens), len(prompts)))


@torch.no_grad()
def answer(model, prompts, max_new_tokens, ctx=None, batch_size=None, what="answers", progress=None):
    """Greedy answers (token lists, without the end-of-text) to prompts (token lists), in their order: each what the
    prompt gets alone. answer_rows' rows (batch_size, or as many as memory allows) decode together, and the moment
    one answer ends the next prompt takes its row (continuous batching), so one long answer never holds the others
    back. ctx: an autocast context, if any. Long work shows progress (progress: the caller's Progress instead of
    its own)."""
    was_training = model.training
    model.eval()
    prompts = [list(p[-(model.config.block_size - 1):]) or [EOT] for p in prompts]  # empty: start from <|endoftext|>
    longest = max(map(len, prompts), default=1)
    answers, progress = [[] for _ in prompts], progress or Progress(what, len(prompts), "prompts")
    try:
        if prompts and max_new_tokens > 0:
            rows = answer_rows(model, prompts, max_new_tokens, batch_size)
            answering = Answering(model, prompts, max_new_tokens, rows, answer_cache_length(model, longest,
                                                                                           max_new_tokens))
            with ctx or nullcontext():
                for ended in answering.run():
                    for i, ids in ended:
                        answers[i] = ids
                    progress.update(len(ended), answering.partial())
    finally:  # an error (or Ctrl-C) leaves the model as it found it
        model.train(was_training)
    return answers


class Answering:
    """answer()'s rows on one KV cache. Every row's tokens end at the same column, col, so a step feeds every row's
    pending token through the model together, each row's padding masked (valid). When a row's answer ends, the next
    prompts are prefilled as a batch of their own and their keys and values are written into free rows, just left
    of col: prompts join longest first, so each fits there. When a joining answer would run past the cache's end,
    the columns left of every row's first are cut off (one copy of the cache). (batching.Engine, for serve.py's
    requests, which come at any time, copies the cache to line rows up instead; here every prompt is known first.)"""

    def __init__(self, model, prompts, max_new_tokens, rows, length):
        self.model, self.prompts, self.length, self.device = model, prompts, length, model.wte.weight.device
        self.max_new = [min(max_new_tokens, model.config.block_size - len(p)) for p in prompts]
        self.waiting = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # longest last: popped first
        self.slot, self.first, self.out, self.next = [None] * rows, [0] * rows, [[] for _ in range(rows)], [EOT] * rows
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=self.device)
        self.col = 0

    def live(self):
        return [r for r, i in enumerate(self.slot) if i is not None]

    def caches(self):
        return [block.attn.kv_cache for block in self.model.h]

    def run(self):
        """Yield, after every step, the [(prompt index, answer)] that ended in it (often none)."""
        self.model.setup_cache(len(self.slot), self.length)
        try:
            while self.waiting or self.live():
                ended = self.fill()
                yield ended + (self.step() if self.live() else [])
        finally:
            self.model.clear_cache()

    def partial(self):
        """How many answers' worth the rows being written have done: tokens so far over the most they may have."""
        return sum(len(self.out[r]) / self.max_new[self.slot[r]] for r in self.live())

    def fill(self):
        """Waiting prompts into the free rows, as many as have room for their answers."""
        free = [r for r, i in enumerate(self.slot) if i is None]
        if not free or not self.waiting:
            return []
        if len(free) == len(self.slot):  # nothing in the cache is needed any more: start at the next prompt's end
            self.col = len(self.prompts[self.waiting[-1]])
        elif self.col + self.max_new[self.waiting[-1]] > self.length:
            self.compact()
        joining = []
        while self.waiting and len(joining) < len(free) and self.col + self.max_new[self.waiting[-1]] <= self.length:
            joining.append(self.waiting.pop())
        return self.join(joining, free) if joining else []

    def join(self, joining, free):
        """Prefill the joining prompts as a left-padded batch in caches of their own, write each one's keys and
        values into a free row, ending at col, and take each one's first token."""
        logits, prefilled, valid = prefill_apart(self.model, [self.prompts[i] for i in joining], self.device)
        firsts, ended, width = logits.argmax(dim=-1).tolist(), [], valid.size(1)
        for j, (i, r) in enumerate(zip(joining, free)):
            n = len(self.prompts[i])
            for cache, new in zip(self.caches(), prefilled):
                cache.k[r, :, self.col - n:self.col] = new.k[j, :, width - n:width]
                cache.v[r, :, self.col - n:self.col] = new.v[j, :, width - n:width]
            self.valid[r] = False
            self.valid[r, self.col - n:self.col] = True
            self.slot[r], self.first[r], self.out[r] = i, self.col - n, []
            ended += self.take(r, firsts[j])
        return ended

    def step(self):
        """One token for every row: the pending tokens go through the model together, at column col."""
        live = self.live()
        self.valid[live, self.col] = True
        decode = self.model.decode_step or self.model.next_logits
        logits = decode(torch.tensor(self.next, device=self.device)[:, None], self.col, self.valid[:, :self.col + 1])
        self.col += 1
        picks = logits.float().argmax(dim=-1).tolist()  # the same picks; on the CPU 2x faster than bf16's argmax
        ended = [done for r in live for done in self.take(r, picks[r])]
        if not self.waiting and 0 < 2 * len(self.live()) <= len(self.slot):
            self.keep(self.live())  # the last answers: fewer rows make a cheaper step
        return ended

    def take(self, r, token):
        """Row r's new token: [(prompt index, answer)] if it ends the answer, else [] (the token is fed next)."""
        i = self.slot[r]
        if token != EOT:
            self.out[r].append(token)
            if len(self.out[r]) < self.max_new[i]:
                self.next[r] = token
                return []
        self.slot[r] = None
        self.valid[r] = False
        return [(i, self.out[r])]

    def compact(self):
        """Cut off the columns left of the first one any row uses: col moves left by as many (a copy of the cache)."""
        cut = min(self.first[r] for r in self.live())
        if cut == 0:
            return
        for cache in self.caches():
            for key in ("k", "v"):
                t = getattr(cache, key)
                setattr(cache, key, torch.cat([t[:, :, cut:], t.new_zeros(*t.shape[:2], cut, t.size(3))], dim=2))
        self.valid = torch.cat([self.valid[:, cut:], self.valid.new_zeros(len(self.slot), cut)], dim=1)
        self.col, self.first = self.col - cut, [f - cut for f in self.first]

    def keep(self, rows):
        """Only these rows stay in the cache (a copy of it)."""
        index = torch.tensor(rows, device=self.device)
        for cache in self.caches():
            cache.k, cache.v = cache.k[index], cache.v[index]
        self.valid = self.valid[index]
        self.slot, self.first, self.out, self.next = ([x[r] for r in rows] for x in (self.slot, self.first, self.out,
                                                                                      self.next))


class Progress:
    """'what: done/total unit (pct) | rate | ETA' on stderr for long work: in place on a terminal, a line every
    5 s in a log; nothing for work that ends within its first `quiet` seconds (0: a line at the end, always)."""

    def __init__(self, what, total, unit="examples", quiet=2.0):
        self.what, self.total, self.unit, self.done, self.tty = what, total, unit, 0, sys.stderr.isatty()
        self.start = self.shown = time.time()
        self.printed, self.quiet = False, quiet

    def update(self, n=1, partial=0.0):
        """n more are done. partial: how many units' worth of the work in hand is done besides (answers being
        written: tokens so far over the most they may have), which the percentage and the ETA count too, so that
        work whose units all end late still shows how far it is."""
        self.done += n
        now, end = time.time(), self.done >= self.total
        if now - self.start < self.quiet and not (end and self.printed):
            return
        if not end and now - self.shown < (0.5 if self.tty else 5) and self.printed:
            return
        elapsed, worth = now - self.start, self.done + (0 if end else partial)
        if not (end or worth):
            return
        when = f"done in {clock(elapsed)}" if end else f"ETA {clock(elapsed * (self.total - worth) / worth)}"
        percent = 100 * worth / max(self.total, 1) if end else min(99, 100 * worth / self.total)  # 100: only at the end
        rate = self.done / max(elapsed, 1e-9)
        line = (f"{self.what}: {self.done:,}/{self.total:,}{' ' + self.unit if self.unit else ''} "
                f"({percent:.0f}%) | {rate:,.{0 if rate >= 100 else 2}f}/s | {when}")
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


# ----------------------------------------------------------------------------- scoring given text

PIECE_ROWS = (64, 128, 256)  # rows of the head's output made at a time: the fastest is timed on each machine
TIMED_ROWS = 256  # rows per timed chunk, each cut into pieces of one candidate size
piece_rows = {}  # piece_key: the fastest of PIECE_ROWS, once each has been timed three times
piece_timings = {}  # piece_key: {size: [seconds per chunk]} until then


def piece_key(model, device, dtype):
    """What the head's best piece size depends on: the device, the dtype of its products, the head's shape."""
    return device, dtype, tuple(model.lm_head.weight.shape)


def head_logprobs(model, hidden, wanted):
    """log p(wanted) under model's head for each row of hidden (N, C), a piece of rows at a time (float32).

    The piece size is a speed choice that differs by CPU: on an Intel Xeon 64 rows ran ~3x faster than 2,400 at
    once (a piece of logits stays in the cache), while on an AMD EPYC float32 runs ~13-28% faster in pieces of 256
    than of 64 and bf16 ~12-14% in pieces of 128. So it is timed on the rows being scored: chunks of TIMED_ROWS are
    cut by each candidate in turn until each has done three, and the fastest is kept for the process. The timing
    does no extra work: the chunks' results are the answer."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    key, done = piece_key(model, device, dtype), []
    while key not in piece_rows and len(hidden) >= TIMED_ROWS:
        timings = piece_timings.setdefault(key, {size: [] for size in PIECE_ROWS})
        size = min(timings, key=lambda k: len(timings[k]))  # the candidate timed least so far
        start = time.perf_counter()
        done.append(pieces_logprobs(model, hidden[:TIMED_ROWS], wanted[:TIMED_ROWS], size))
        if device != "cpu":  # a GPU's work is queued: wait for it
            getattr(torch, device).synchronize()
        timings[size].append(time.perf_counter() - start)
        if min(map(len, timings.values())) >= 3:  # the best of three: a shared machine's noise, the first bf16 cast
            piece_rows[key] = min(timings, key=lambda k: min(timings[k]))
        hidden, wanted = hidden[TIMED_ROWS:], wanted[TIMED_ROWS:]
    return torch.cat(done + [pieces_logprobs(model, hidden, wanted, piece_rows.get(key, PIECE_ROWS[0]))])


def pieces_logprobs(model, hidden, wanted, size):
    """head_logprobs with pieces of `size` rows."""
    return torch.cat([torch.log_softmax(model.lm_head(h).float(), dim=-1).gather(1, t[:, None])[:, 0]
                      for h, t in zip(hidden.split(size), wanted.split(size))] or [hidden.new_zeros(0).float()])


@torch.no_grad()
def target_logprobs(model, idx, targets, ctx=None):
    """(sum, count): per row of idx (B, T), the summed log-probability of its targets (B, T; the next tokens,
    IGNORE where nothing is scored) and how many were scored. The head runs on the scored positions only, a piece
    of rows at a time (head_logprobs): a (B, T, 50257) logits tensor is never made. ctx: an autocast context."""
    was_training = model.training
    model.eval()
    scored = targets != IGNORE
    with ctx or nullcontext():
        logp = head_logprobs(model, model.hidden_states(idx)[scored], targets[scored])
    rows = torch.arange(idx.size(0), device=idx.device)[:, None].expand_as(targets)[scored]
    sums = torch.zeros(idx.size(0), dtype=torch.float64, device=idx.device).index_add_(0, rows, logp.double())
    model.train(was_training)
    return sums.tolist(), scored.sum(1).tolist()
