"""
What training and generation read: GPT-2's tokenizer, the prompt template, and the splits prepare.py wrote
(memory-mapped), cut into padded batches.

    split = Split("data/instruction-data", "train")
    x, y = split.batch([0, 1, 2, 3], mask_prompt=False, device="cpu")   # inputs and shifted targets
"""

import json
import os
import string
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np
import tiktoken
import torch

EOT = 50256  # <|endoftext|>: ends every example, pads batches, and stops generation
IGNORE = -100  # the target value that carries no loss (PyTorch's and Hugging Face's default)

ALPACA_TEMPLATE = {  # the prompt of "Build a LLM from scratch" ch07; the response follows it directly
    "prompt": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    "prompt_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n"),
}


def format_prompt(instruction, input_text="", template=ALPACA_TEMPLATE):
    """The text the model sees before its response; the Input section only appears when there is input."""
    if input_text:
        return template["prompt_input"].format(instruction=instruction, input=input_text)
    return template["prompt"].format(instruction=instruction)


def check_template(template):
    """template, if it is a prompt template format_prompt can fill (both texts, with their fields); else a
    ValueError saying what is wrong."""
    try:
        for key, fields in (("prompt", {"instruction"}), ("prompt_input", {"instruction", "input"})):
            used = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template[key])
                    if name is not None]
            if {name for name, _, _ in used} != fields or any(spec or conversion for _, spec, conversion in used):
                raise ValueError(f"'{key}' must have the fields {{{'}, {'.join(sorted(fields))}}} and no others, "
                                 f"as they are (no format specs)")
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"its prompt template is not usable ({e.__class__.__name__}: {e}): it needs 'prompt' and "
                         f"'prompt_input' texts with an {{instruction}} field (and {{input}} in the second)") from None
    return template


class TokenizerUnavailable(OSError):
    pass


def tokenizer():
    """GPT-2's tokenizer; tiktoken downloads its two files once (or finds them in TIKTOKEN_CACHE_DIR)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without the files: requests' errors, or tiktoken's own on a bad file
        raise TokenizerUnavailable(
            f"GPT-2's tokenizer files could not be loaded ({e.__class__.__name__}): with no network, set "
            f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files (vocab.bpe, encoder.json), or run once "
            f"online to cache them") from None


def encode_batch(texts):
    """The token ids (uint32 arrays) of many texts, on all cores. Each thread encodes a chunk of texts:
    tiktoken's encode_ordinary_batch makes one task per text and ran slower than one thread here."""
    enc, threads = tokenizer(), os.cpu_count() or 1
    size = max(1, -(-len(texts) // (4 * threads)))
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]

    def encode(chunk):  # nothing allowed, nothing disallowed: a literal "<|endoftext|>" stays plain text
        return [enc.encode_to_numpy(text, disallowed_special=()) for text in chunk]
    with ThreadPoolExecutor(threads) as pool:
        return list(chain.from_iterable(pool.map(encode, chunks)))


# ----------------------------------------------------------------------------- prepared splits

def read_meta(folder):
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (it has no meta.json): run prepare.py")
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(folder, split):
    """One prepared split, memory-mapped: 'tokens' and 'offsets' (example i is tokens[offsets[i]:offsets[i+1]])
    and 'prompt_len' (instruction sets) or 'labels' (classification)."""
    splits = read_meta(folder)["splits"]
    if split not in splits:
        raise ValueError(f"{folder} has no '{split}' split; it has {', '.join(splits)}")
    arrays = {}
    for key in ("tokens", "offsets", "prompt_len", "labels"):
        path = Path(folder) / f"{split}.{key}.npy"
        if path.exists():
            arrays[key] = np.load(path, mmap_mode="r")
    return arrays


def load_records(folder, split):
    """The records of a split, in the order of its examples (the reference outputs, the labels as text)."""
    with open(Path(folder) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Split:
    """One prepared instruction split: examples read straight from prepare.py's memory-mapped arrays."""

    def __init__(self, folder, name):
        self.arrays = load_split(folder, name)
        self.offsets = self.arrays["offsets"]
        self.lengths = np.diff(self.offsets)

    def __len__(self):
        return len(self.lengths)

    def example(self, i):
        tokens = self.arrays["tokens"][self.offsets[i]:self.offsets[i + 1]]
        return tokens, int(self.arrays["prompt_len"][i])

    def tokens(self, indices, most):
        """How many tokens the examples at indices have, each cut to its first `most`: what evaluating them costs,
        the count an evaluation's progress line shows (its batches run shortest first, so batches would mislead)."""
        return int(np.minimum(self.lengths[np.asarray(indices, dtype=np.int64)], most).sum())

    def prompt(self, i):
        """Example i's prompt as a list of ids: what the model answers from."""
        tokens, prompt_len = self.example(i)
        return tokens[:prompt_len].tolist()

    def batch(self, indices, mask_prompt, device):
        return collate([self.example(i) for i in indices], mask_prompt, device=device)

    def eval_batches(self, batch_size, max_batches, mask_prompt, rank=0, world=1, device="cpu"):
        """[(inputs, targets)] of the split, or of its first max_batches batches (0: all of it), each process
        taking every world-th batch. Examples are cut into batches in order of length, so little is padding."""
        order = np.argsort(self.lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        return [self.batch(indices, mask_prompt, device)
                for indices in (batches[:max_batches] if max_batches else batches)[rank::world]]


class TextSplit:
    """A prepared text split: its uint16 shards, memory-mapped, read as windows of block_size + 1 tokens (the
    inputs, and the same shifted by one as targets), nanoGPT's way."""

    def __init__(self, folder, name):
        shards = [s for s in read_meta(folder)["shards"] if s["split"] == name]
        self.shards = [np.load(Path(folder) / s["file"], mmap_mode="r") for s in shards]
        self.tokens = sum(len(shard) for shard in self.shards)

    def window(self, shard, start, block_size):
        return np.asarray(self.shards[shard][start:start + block_size + 1], dtype=np.int64)

    def stack(self, windows, device):
        batch = torch.from_numpy(np.stack(windows))
        return batch[:, :-1].to(device), batch[:, 1:].to(device)

    def random_batch(self, batch_size, block_size, seed, device="cpu"):
        """batch_size windows at random places, drawn with a generator seeded by seed (a list of numbers: the
        run's seed, the process's rank and the step), so that a resumed run draws exactly the same."""
        starts = np.array([max(0, len(s) - block_size) for s in self.shards])  # where a window can begin
        rng = np.random.default_rng(seed)
        shards = rng.choice(len(self.shards), size=batch_size, p=starts / starts.sum())
        return self.stack([self.window(k, int(rng.integers(starts[k])), block_size) for k in shards], device)

    def starts(self, block_size):
        """(shard, start) of the split's fixed windows: one after another, from its beginning."""
        return [(k, start) for k, shard in enumerate(self.shards) for start in range(0, len(shard) - block_size,
                                                                                      block_size)]

    def eval_batches(self, batch_size, max_batches, block_size, rank=0, world=1, device="cpu"):
        """[(inputs, targets)] of the fixed windows, batch_size at a time (the first max_batches batches; 0: all),
        each process taking every world-th batch."""
        starts = self.starts(block_size)
        batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
        return [self.stack([self.window(k, start, block_size) for k, start in batch], device)
                for batch in (batches[:max_batches] if max_batches else batches)[rank::world]]


# ----------------------------------------------------------------------------- batches

def collate(examples, mask_prompt=False, pad_id=EOT, device="cpu"):
    """(inputs, targets) for a list of (token ids, prompt length) examples, each ending in <|endoftext|>.

    Inputs are padded with <|endoftext|>; targets are the inputs shifted by one, so each example's own
    final <|endoftext|> stays a target (the model learns to stop) while padding targets are IGNORE.
    With mask_prompt, the targets that are prompt tokens are IGNORE too.
    """
    width = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        if mask_prompt:
            targets[row, :prompt_len - 1] = IGNORE  # target j is token j+1: tokens 1..prompt_len-1
    return inputs.to(device), targets.to(device)


def length_grouped_batches(lengths, batch_size, seed, epoch):
    """This epoch's batches (lists of example indices): shuffled, then grouped by length within windows of
    50 batches so a batch pads little, then the batches shuffled so lengths don't trend through the epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(batches, lengths):
    real = sum(lengths[b].sum() for b in batches)
    padded = sum(lengths[b].max() * len(b) for b in batches)
    return 1 - real / padded
