"""
Generate text with GPT-2 or a model fine-tuned by finetune.py: continue a prompt, answer an instruction, chat.

    python sample.py --prompt="Every effort moves you"                          # gpt2 continues it
    python sample.py --model=out/alpaca/ckpt.pt --prompt="Give three tips for staying healthy."
    python sample.py --model=out/alpaca/ckpt.pt --chat=True                    # /reset forgets, /quit leaves
    python sample.py --prompt=FILE:prompts.txt --batch=True --temperature=0    # one prompt a line, one batch
    python sample.py --quantize=int8 --compile=True                            # fastest on a CPU (bench.py)

The text streams to stdout as it is generated; warnings and speed go to stderr. A checkpoint written by
finetune.py carries its prompt template: the prompt is wrapped in it and only the response is printed.
"""

import sys
import time
from pathlib import Path

import torch

from configurator import checked, configure, fail, seed_problems
from data import EOT, tokenizer
from download import DownloadError
from generation import (TextStream, apply_template, chat_ids, cut_at_stops, device_problem, fit_context, left_pad,
                        pick_device, template_of, until_eot, warn, weights_dtype)
from load_gpt2 import load_model
from quantize import ready_for_generation

# -----------------------------------------------------------------------------
model = "gpt2"  # a GPT-2 name, a Hugging Face folder, a .safetensors file or finetune.py's ckpt.pt
prompt = ""  # the text, or FILE:path to read it from a file; empty: start from <|endoftext|>
input_ = ""  # the optional Input section of an instruction (used with a template)
template = "auto"  # auto: the checkpoint's own prompt template, if it has one; none; alpaca
batch = False  # one prompt per line, generated together as one left-padded batch
chat = False  # an interactive loop: each line you type is answered; /reset, /quit
num_samples = 1  # texts generated one after another (each from the same prompt)
max_new_tokens = 200  # the most new tokens per text
temperature = 0.8  # 0: greedy
top_k = None  # keep only the k most likely tokens (None: no limit)
top_p = 0.95  # keep the fewest most likely tokens whose probabilities add up to top_p (1.0: all)
stop = None  # a string or a list of strings that ends the text (and is not printed), besides <|endoftext|>
seed = 1337  # the same seed gives the same text
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto (float32 on the CPU, bf16 or fp16 on a GPU), float32, bfloat16 or float16
quantize = "none"  # none or int8: int8 weights, 4x fewer bytes to read per token than float32
compile_ = False  # torch.compile the one-token decode step (the first answer waits for the compile)
# -----------------------------------------------------------------------------

SEPARATOR = "---------------"  # a line between samples, as nanoGPT prints them


def check_settings(c):
    """Impossible values, found before anything is loaded; returns the list of problems."""
    problems = []
    if not c["temperature"] >= 0:
        problems.append(f"temperature={c['temperature']} must be 0 (greedy) or more")
    if c["top_k"] is not None and not (type(c["top_k"]) is int and c["top_k"] >= 1):
        problems.append(f"top_k={c['top_k']!r} must be a whole number of at least 1, or None")
    if not (isinstance(c["top_p"], (int, float)) and 0 < c["top_p"] <= 1):
        problems.append(f"top_p={c['top_p']!r} must be in (0, 1]; 1.0 keeps every token")
    problems += [f"{k}={c[k]} must be at least 1" for k in ("max_new_tokens", "num_samples") if c[k] < 1]
    stops = [c["stop"]] if isinstance(c["stop"], str) else c["stop"]
    if stops is not None and not (isinstance(stops, (list, tuple)) and all(isinstance(s, str) and s for s in stops)):
        problems.append(f"stop={c['stop']!r} must be a non-empty string or a list of them")
    for key, allowed in (("template", ("auto", "none", "alpaca")), ("quantize", ("none", "int8")),
                         ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if c[key] not in allowed:
            problems.append(f"{key}='{c[key]}' must be one of {', '.join(allowed)}")
    if c["chat"] and c["batch"]:
        problems.append("chat=True and batch=True do not go together")
    if c["prompt"].startswith("FILE:") and not Path(c["prompt"][5:]).is_file():
        problems.append(f"prompt file '{c['prompt'][5:]}' does not exist (or is not a file)")
    problems += seed_problems(c["seed"])
    return problems + [p for p in [device_problem(c["device"])] if p]


MAX_PROMPT_FILE = 1 << 24  # 16 MB: more than a batch of prompts needs; a larger file is refused, not tokenized


def read_prompt(prompt):
    """The prompt text: the setting itself, or with FILE:path, that file (UTF-8)."""
    if not prompt.startswith("FILE:"):
        return prompt
    path = Path(prompt[5:])
    if path.stat().st_size > MAX_PROMPT_FILE:
        fail(f"prompt file '{path}' is {path.stat().st_size:,} bytes, more than the {MAX_PROMPT_FILE:,} a prompt (or "
             f"a batch of them) may be: only the last tokens of a long prompt fit the context anyway")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        fail(f"prompt file '{prompt[5:]}' is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8")


def stream(gpt, ids, enc, stops, generator, **sampling):
    """Generate after ids (a list of token ids), printing the text as it comes. Returns the new ids (the
    end-of-text is not among them; the text is cut before a stop string) and the times of each token."""
    text = TextStream(enc, stops)
    steps = gpt.generate_stream(torch.tensor([ids], device=gpt.wte.weight.device), eos_id=EOT,
                                generator=generator, **sampling)
    new, times = [], [time.time()]
    try:
        for next_id in steps:
            token = next_id.item()
            times.append(time.time())
            if token == EOT or text.add(token):
                break
            new.append(token)
    finally:
        steps.close()  # frees the KV cache now, not when the generator is collected
        text.finish()
    return new, times


def speed(times, rows=1):
    """Tokens/s on stderr; the first token (the prompt's prefill, and the compile if any) apart from the rest."""
    total, first, n = times[-1] - times[0], times[1] - times[0], len(times) - 1
    rate = f", then {rows * (n - 1) / (total - first):.1f} tokens/s" if n > 1 and total > first else ""
    print(f"[{rows * n} tokens in {total:.2f} s: the first after {first:.2f} s{rate}]", file=sys.stderr)


def generate_batch(gpt, prompts, enc, stops, generator, **sampling):
    """Continuations of many prompts (lists of ids) as one batch: left padding and a valid mask give each row what
    it would get alone. Returns the texts, each cut at end-of-text or a stop string, and the times of each step."""
    idx, valid = left_pad(prompts, gpt.wte.weight.device)
    columns, times = [], [time.time()]
    for next_id in gpt.generate_stream(idx, valid=valid, eos_id=EOT, generator=generator, **sampling):
        columns.append(next_id)
        times.append(time.time())
    texts = [cut_at_stops(enc.decode(until_eot(row)), stops) for row in torch.stack(columns, dim=1).tolist()]
    return texts, times


def chat_loop(gpt, enc, template, stops, generator, **sampling):
    """Answer each line typed on stdin; the conversation so far is the context of the next answer."""
    print("type a message; /reset forgets the conversation, /quit (or Ctrl-D) leaves", file=sys.stderr)
    messages = []  # the conversation so far, folded into the prompt by generation.chat_ids (as serve.py does)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = fit_context(chat_ids(enc, messages, template), gpt.config.block_size, sampling["max_new_tokens"])
        new, _ = stream(gpt, ids, enc, stops, generator, **sampling)
        print()
        messages.append({"role": "assistant", "content": new})  # the ids as generated, not re-tokenized


def warm_up(gpt, rows, batch):
    """Compile the decode step now, for this run's batch shape, so that the speed shown is the speed."""
    print("compiling the decode step (once, 10-60 s)", file=sys.stderr)
    idx = torch.full((rows, 2), EOT, device=gpt.wte.weight.device)  # positions 0 and 1 would be special cases
    gpt.generate(idx, 2, temperature=0, valid=torch.ones_like(idx, dtype=torch.bool) if batch else None)


def main(config):
    c = checked(config, check_settings(config))
    text = read_prompt(c.prompt)
    dev = pick_device(c.device)
    torch.manual_seed(c.seed)
    try:
        gpt, info = load_model(c.model, device=dev, dtype=weights_dtype(c.dtype, torch.device(dev).type))
        enc = tokenizer()
    except (DownloadError, ValueError, OSError) as e:
        fail(str(e))
    lines = ([line for line in text.splitlines() if line.strip()] or [""]) if c.batch else [text]
    ready_for_generation(gpt, c.quantize, c.compile, rows=len(lines))  # the kernel for a step of this many rows
    template = template_of(c.template, info["template"])
    if c.input and template is None:
        warn("input= is only used with a prompt template; this model has none (see template=)")
    stops = [c.stop] if isinstance(c.stop, str) else list(c.stop or [])
    generator = torch.Generator(dev).manual_seed(c.seed)
    sampling = dict(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets '?', not a crash
        sys.stdout.reconfigure(errors="replace")

    if c.chat:
        if c.compile:
            warm_up(gpt, 1, False)
        return chat_loop(gpt, enc, template, stops, generator, **sampling)
    prompts = [apply_template(line, template, c.input) for line in lines]
    ids = [fit_context(enc.encode_ordinary(p) or [EOT], gpt.config.block_size, c.max_new_tokens) for p in prompts]
    room = gpt.config.block_size - max(map(len, ids))
    if c.max_new_tokens > room:
        warn(f"max_new_tokens={c.max_new_tokens}, but only {room} more tokens fit in the {gpt.config.block_size}-token "
             f"context after the prompt: the text ends there")
    if c.compile:
        warm_up(gpt, len(ids), c.batch)
    for k in range(c.num_samples):
        if k:
            print(SEPARATOR)
        if c.batch:
            texts, times = generate_batch(gpt, ids, enc, stops, generator, **sampling)
            for i, (line, t) in enumerate(zip(lines, texts)):
                if i:
                    print(SEPARATOR)
                print(t if template else line + t)
            speed(times, rows=len(texts))
        else:
            if template is None:
                print(text, end="", flush=True)  # the continuation follows the prompt
            _, times = stream(gpt, ids[0], enc, stops, generator, **sampling)
            print()
            speed(times)


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:  # Ctrl-C while generating: stop without a traceback
        print()
        sys.exit(130)
