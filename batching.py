"""
Continuous batching for model.py's GPT-2: many texts generated together on one KV cache, each as it would be
alone. Texts join between two steps and leave the moment they end. serve.py runs its requests through it.

    engine = Engine(gpt, max_batch=16, max_queue=64)
    engine.thread.start()
    job = Job()
    job.rows = [Row(job, 0, enc.encode_ordinary("Hello"), 20, (0.8, None, 0.95), 1337, enc, [], "cpu")]
    engine.submit(job)
    job.events.get()   # (0, 'text the token completed', None or 'stop' or 'length', tokens so far)

How: every row (one text) is left-padded so that its tokens end in the same column of the cache as every other
row's (valid is False on the padding), and a step feeds each row's last token through the model together, at that
column. Rows that join have their prompts prefilled as a batch of their own; their caches are then put beside the
running ones, both right-aligned. A row that ends is dropped from the cache, and so is padding no row needs any
more. Each row picks its tokens with sample_next and its own torch.Generator, exactly as sample.py does with its
one: a row seeded with s gives sample.py's text for --seed=s, and greedy rows give what model.generate gives.
"""

import queue
import threading
import traceback
from collections import deque

import torch
from torch.nn import functional as F

from data import EOT
from generation import TextStream, prefill_apart
from model import sample_next


class QueueFull(Exception):
    """max_queue jobs are waiting already."""


class Closed(Exception):
    """The engine is stopping: it takes no new jobs."""


class Job:
    """Rows submitted together (one request's texts) and the engine's reports on them, in events: (choice, new
    text, finish_reason or None, tokens so far) as each token comes, or ("error", "closed" or "failed", message)."""

    def __init__(self):
        self.rows, self.events, self.cancelled = [], queue.SimpleQueue(), False  # cancelled: rows leave at once

    def fail(self, reason, message):
        if not self.cancelled:
            self.events.put(("error", reason, message))
        self.cancelled = True


class Pieces(list):
    """Where a row's TextStream writes: the text it let through, kept until the engine reports it."""

    def write(self, text):
        self.append(text)

    def flush(self):
        pass

    def take(self):
        text = "".join(self)
        self.clear()
        return text


class Row:
    """One text being generated: its prompt (token ids), how it picks tokens (temperature, top_k, top_p and its own
    generator, seeded or random), and its text so far, cut before a stop string; choice: its index in the job."""

    def __init__(self, job, choice, ids, max_new, sampling, seed, enc, stops, device):
        self.job, self.choice, self.ids, self.max_new, self.generated = job, choice, ids, max_new, 0
        self.temperature, self.top_k, self.top_p = sampling
        self.generator = torch.Generator(device)
        if seed is None:
            self.generator.seed()  # a fresh random seed
        else:
            self.generator.manual_seed(seed)
        self.out = Pieces()
        self.text = TextStream(enc, stops, out=self.out)  # whole UTF-8 characters, as sample.py prints them

    @property
    def left(self):
        return self.max_new - self.generated

    def pick(self, logits):
        """The next token from this row's logits (1, vocab), as sample.py picks from its own."""
        return sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator).item()

    def add(self, token):
        """Take the picked token and report the text it completes; True when the row has ended."""
        self.generated += 1
        finish = "stop" if token == EOT or self.text.add(token) else "length" if self.left == 0 else None
        if finish:
            self.text.finish()
        text = self.out.take()
        if text or finish:
            self.job.events.put((self.choice, text, finish, self.generated))
        return finish is not None


class Engine:
    """Generates every admitted row together, one token per step, in a thread of its own (start engine.thread).

    The rows' tokens all end at column `width` of the model's KV cache, so a step feeds every row's pending token
    (picked, not yet seen by the model) at position width in one forward pass. A row's prompt and max_new must fit
    in the context (generation.fit_context); rows wait until there is room beside the others."""

    def __init__(self, gpt, max_batch, max_queue):
        self.gpt, self.max_batch, self.max_queue = gpt, max_batch, max_queue
        self.device, self.block_size = gpt.wte.weight.device, gpt.config.block_size
        self.waiting, self.rows = deque(), []  # rows not started (first come, first served); rows in the batch
        self.width, self.valid, self.pending = 0, None, None
        self.changed, self.stopping = threading.Condition(), False
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def submit(self, job):
        with self.changed:
            if self.stopping:
                raise Closed("the server is shutting down")
            if len({id(row.job) for row in self.waiting}) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already (max_queue): try again soon")
            self.waiting.extend(job.rows)
            self.changed.notify()

    def stop(self, cancel=False):
        """Take no more jobs and fail those waiting; with cancel, end the rows being generated too (else they
        finish). The thread ends once no row is left."""
        with self.changed:
            self.stopping = True
            for row in list(self.waiting) + (list(self.rows) if cancel else []):
                row.job.fail("closed", "the server is shutting down: this request was cancelled")
            self.waiting.clear()
            self.changed.notify()

    def run(self):
        """Admit waiting rows that fit, advance the batch by one token, repeat; sleep while there is nothing."""
        with torch.no_grad():
            while True:
                with self.changed:
                    while not (self.waiting or self.rows or self.stopping):
                        self.changed.wait()
                    if self.stopping and not self.rows:
                        return
                    self.waiting = deque(row for row in self.waiting if not row.job.cancelled)
                    joining = self.admit()
                try:
                    self.keep([not row.job.cancelled for row in self.rows])  # a client hung up: its rows leave
                    if joining:
                        self.join(joining)
                    if self.rows:
                        self.step()
                except Exception:  # the log gets the traceback, the clients one line, and the engine goes on
                    traceback.print_exc()
                    for row in self.rows + joining:
                        row.job.fail("failed", "generation failed; the server's log has the details")
                    self.rows = []
                    self.keep([])

    def admit(self):
        """The waiting rows that join now, in order, while the batch has room: max_batch rows, and a context
        as wide as the widest row plus the most tokens any row still needs."""
        joining, width, left = [], self.width, [row.left for row in self.rows]
        while self.waiting and len(self.rows) + len(joining) < self.max_batch:
            row = self.waiting[0]
            if max(width, len(row.ids)) + max(left + [row.left]) > self.block_size:
                break  # it waits for rows to leave, and nobody overtakes it
            joining.append(self.waiting.popleft())
            width, left = max(width, len(row.ids)), left + [row.left]
        return joining

    def caches(self):
        return [block.attn.kv_cache for block in self.gpt.h]

    def join(self, rows):
        """Prefill the prompts of rows as a left-padded batch of their own, pick each one's first token, and put
        the rows that go on beside the running ones."""
        logits, prefilled, valid = prefill_apart(self.gpt, [row.ids for row in rows], self.device)
        picks = [row.pick(logits[i:i + 1]) for i, row in enumerate(rows)]
        going_on = [i for i, (row, token) in enumerate(zip(rows, picks)) if not row.add(token)]
        if going_on:
            index = torch.tensor(going_on, device=self.device)
            pending = torch.tensor(picks, device=self.device)[index]
            self.merge([rows[i] for i in going_on], prefilled, index, valid[index], pending)

    def merge(self, rows, prefilled, index, valid, pending):
        """Put rows beside the batch (prefilled: their caches, in which they are rows index): all right-aligned
        at the wider width, padding on the left, and room on the right for the most tokens a row still needs."""
        width = max(self.width, valid.size(1))
        room = width + max(row.left for row in self.rows + rows)

        def place(t, rows_index, used):  # (B, n_head, columns, head_dim): the used columns end at width
            return F.pad(t[rows_index, :, :used], (0, 0, width - used, room - width))

        for block, new in zip(self.gpt.h, prefilled):
            old = block.attn.kv_cache
            for key in ("k", "v"):
                t = place(getattr(new, key), index, valid.size(1))
                if self.rows:
                    t = torch.cat([place(getattr(old, key), slice(None), self.width), t])
                setattr(new, key, t)
            block.attn.kv_cache = new

        def pad(m):
            return torch.cat([m.new_zeros(m.size(0), width - m.size(1)), m], dim=1)
        self.valid = torch.cat([pad(self.valid), pad(valid)]) if self.rows else pad(valid)
        self.pending = torch.cat([self.pending, pending]) if self.rows else pending
        self.rows, self.width = self.rows + rows, width

    def step(self):
        """One token for every row: the pending tokens go through the model together."""
        self.valid = torch.cat([self.valid, self.valid.new_ones(len(self.rows), 1)], dim=1)
        decode = self.gpt.decode_step or self.gpt.next_logits
        logits = decode(self.pending[:, None], self.width, self.valid)
        self.width += 1
        picks = [row.pick(logits[i:i + 1]) for i, row in enumerate(self.rows)]
        self.pending = torch.tensor(picks, device=self.device)
        self.keep([not row.add(token) for row, token in zip(self.rows, picks)])

    def keep(self, alive):
        """Only the rows where alive is True stay; the columns of padding no row needs now are cut off the left."""
        index = [i for i, stays in enumerate(alive) if stays]
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            self.gpt.clear_cache()
            self.width, self.valid, self.pending = 0, None, None
        elif len(index) < len(alive):
            index = torch.tensor(index, device=self.device)
            valid = self.valid[index]
            cut = int(valid.any(dim=0).int().argmax())  # the first column a row still uses
            for cache in self.caches():
                cache.k, cache.v = cache.k[index, :, cut:], cache.v[index, :, cut:]
            self.valid, self.pending, self.width = valid[:, cut:], self.pending[index], self.width - cut
