"""
Benchmarks of training and data preparation, run by hand (none of them is a test). Pick one with --what:

    python bench_train.py                    # what=train: a full training step vs transformers, like for like
    python bench_train.py --what=lora        # full fine-tuning vs LoRA: peak memory and speed of a step
    python bench_train.py --what=prepare     # a 1 GB text corpus into shards: MB/s and peak memory

train: one full step (forward, backward, fused AdamW) on the gpt2 (124M) config at train_batch x train_block
tokens, ours and transformers' GPT2LMHeadModel on the same weights, with the same dropout, both with bf16
autocast and fused AdamW, interleaved; the median of train_rounds steps. The reference runs twice: in a process
of its own with glibc's defaults, as a transformers training script runs, and in this process, where it gets the
malloc settings finetune.py makes (keep_freed_memory). Beside them: the same step's matrix products timed alone.
"""

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from generation import cpu_name
from model import GPT, GPTConfig
from quantize import model_bytes

# -----------------------------------------------------------------------------
what = "train"  # which benchmark: train, lora, prepare
models = ("gpt2", "gpt2-medium")  # what=lora: GPT-2 configs
seed = 1337  # the random weights and batches
train_batch = 4  # what=train: examples of train_block tokens per step
train_block = 256  # what=train: tokens per example
train_rounds = 5  # timed steps per contender (the median counts)
train_compile = False  # also time our model under torch.compile (compiling takes a minute or two)
train_dropout = 0.0  # what=train: the dropout of both models (finetune.py's default); like for like
lora_rank = 16  # what=lora: LoRA on the book's targets (finetune.py's default lora_targets)
corpus_mb = 1024  # what=prepare: MB of generated text-field .jsonl to prepare into shards
threads = 0  # torch threads; 0: torch's default (one per core)
# -----------------------------------------------------------------------------


def train_step(model, optimizer, x, y):
    """finetune.py's step: forward under bf16 autocast, backward, fused AdamW."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def matmul_seconds(c, B, T, rounds):
    """The time the matrix products of one training step take alone, in bf16 as autocast runs them: each Linear's
    forward product and its two backward ones (input and weight gradients), lm_head's too, and attention's two
    forward and four backward products per layer. The median of rounds."""
    M, C, hd = B * T, c.n_embd, c.n_embd // c.n_head
    linears = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * c.n_layer + [(c.vocab_size, C)]
    products = [shape for out, inp in linears for shape in ((M, inp, out), (M, out, inp), (out, M, inp))]
    batched = [(B * c.n_head, T, hd, T), (B * c.n_head, T, T, hd)] * 3 * c.n_layer  # q k^T, att v: fwd and 2 bwd
    operands = [(torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)) for m, k, n in products]
    operands += [(torch.randn(b, m, k, dtype=torch.bfloat16), torch.randn(b, k, n, dtype=torch.bfloat16))
                 for b, m, k, n in batched]
    times = []
    for _ in range(rounds + 1):  # the first warms up
        start = time.perf_counter()
        for a, b in operands:
            torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def reference_train_setup(folder):
    """transformers' GPT2LMHeadModel (saved in folder) and its training step: bf16 autocast, fused AdamW."""
    import transformers
    from transformers import GPT2LMHeadModel
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ref = GPT2LMHeadModel.from_pretrained(folder).train()  # its config.json holds the dropout: the same as ours
    x = torch.randint(0, 50257, (train_batch, train_block), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ref(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def reference_train_process(folder, conn):
    """The reference in a process of its own, with glibc's default malloc settings (as a user runs it): times
    one step each time the benchmark asks, so it is interleaved with the others."""
    step = reference_train_setup(folder)
    while conn.recv():
        start = time.perf_counter()
        step()
        conn.send(time.perf_counter() - start)


def bench_train():
    """Tokens/s of one full training step (forward, backward, fused AdamW) on the gpt2 (124M) config at
    batch x block tokens, ours and transformers' GPT2LMHeadModel on the same weights, bf16 autocast for both."""
    import multiprocessing
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    from training import keep_freed_memory, make_optimizer
    from load_gpt2 import load_gpt2
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    GPT2LMHeadModel(GPT2Config(n_positions=1024, resid_pdrop=train_dropout, embd_pdrop=train_dropout,
                               attn_pdrop=train_dropout)).save_pretrained(folder)
    # started before this process changes its malloc settings; spawn: a fresh interpreter with glibc's defaults
    conn, child_conn = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=reference_train_process, args=(folder, child_conn))
    child.start()
    keep_freed_memory()  # what finetune.py does; the in-process reference gets it too
    ours = load_gpt2(folder, dropout=train_dropout).train()
    x = torch.randint(0, 50257, (train_batch, train_block), generator=torch.Generator().manual_seed(seed))
    y = torch.cat([x[:, 1:], torch.full((train_batch, 1), -100)], dim=1)
    our_opt = make_optimizer(ours, 1e-4, 0.1, (0.9, 0.95), "cpu")
    compiled = torch.compile(ours) if train_compile else None

    def our_step(net=ours):
        train_step(net, our_opt, x, y)

    def child_step():
        conn.send(True)
        return conn.recv()

    steps = {"transformers, in this process (malloc tuned)": reference_train_setup(folder),
             "transformers, own process (malloc as is)": child_step,
             "nanoFT (finetune.py's step)": our_step}
    if compiled is not None:
        steps["nanoFT + torch.compile"] = lambda: our_step(compiled)
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm up (and compile)
        step(), step()
    for _ in range(train_rounds):  # interleaved, so a busy moment hits every contender
        for name, step in steps.items():
            start = time.perf_counter()
            took = step()
            times[name].append(took if name.startswith("transformers, own") else time.perf_counter() - start)
    conn.send(False)
    child.join()
    shutil.rmtree(folder, ignore_errors=True)
    matmuls = matmul_seconds(ours.config, train_batch, train_block, train_rounds)
    tokens = train_batch * train_block
    print(f"\ntraining step (forward, backward, AdamW), gpt2 (124M) config, batch {train_batch} x {train_block} "
          f"tokens, dropout {train_dropout} on both sides, bf16 autocast, fused AdamW, {torch.get_num_threads()} "
          f"threads, median of {train_rounds}; {cpu_name()}")
    print(f"  {'':<48} {'ms/step':>8} {'tok/s':>7}  {'vs in-process':>13}  {'vs own process':>14}  {'/ matmuls':>9}")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, took in medians.items():
        print(f"  {name:<48} {took * 1000:>8.0f} {tokens / took:>7.0f}  "
              f"{medians['transformers, in this process (malloc tuned)'] / took:>12.2f}x  "
              f"{medians['transformers, own process (malloc as is)'] / took:>13.2f}x  {took / matmuls:>8.2f}x")
    print(f"  {'the same matrix products alone (bf16)':<48} {matmuls * 1000:>8.0f}")


def lora_step_process(name, lora, conn):
    """One training setup in a process of its own, so its peak memory is its own: reports the weights' memory,
    the resident memory before the first step and the peak, the median step time and the trainable parameters."""
    import resource
    from training import keep_freed_memory, make_optimizer
    from lora import add_lora
    keep_freed_memory()
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig.from_name(name)).train()
    if lora:
        add_lora(gpt, lora_rank, 16)
    opt = make_optimizer(gpt, 1e-4, 0.1, (0.9, 0.95), "cpu")
    x = torch.randint(0, 50257, (train_batch, train_block), generator=torch.Generator().manual_seed(seed))
    y = torch.cat([x[:, 1:], torch.full((train_batch, 1), -100)], dim=1)
    before = _rss()
    times = []
    for i in range(train_rounds + 1):  # the first step allocates the optimizer state: not timed
        start = time.perf_counter()
        train_step(gpt, opt, x, y)
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    conn.send((model_bytes(gpt), before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               statistics.median(times[1:]), trainable))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_lora():
    """Full fine-tuning vs LoRA: peak memory and speed of a training step (bf16 autocast, fused AdamW, batch
    train_batch x train_block), each setup in a fresh process. Linux: memory is resident memory (RSS); 'peak -
    before' is what training adds to the loaded model: gradients, optimizer state, activations."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    print(f"training step, full vs LoRA rank {lora_rank} (q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj,head), batch "
          f"{train_batch} x {train_block}, bf16 autocast, fused AdamW, random-init weights, median of {train_rounds}")
    print(f"{'model':<12} {'training':<9} {'trainable':>12} {'weights MB':>10} {'peak RSS MB':>11} "
          f"{'peak - before MB':>16} {'step ms':>8} {'tok/s':>6}")
    for name in models:
        for lora in (False, True):
            conn, child_conn = context.Pipe()
            child = context.Process(target=lora_step_process, args=(name, lora, child_conn))
            child.start()
            weights, before, peak, step, trainable = conn.recv()
            child.join()
            print(f"{name:<12} {'LoRA' if lora else 'full':<9} {trainable:>12,} {weights / 1e6:>10.0f} "
                  f"{peak / 1e6:>11.0f} {(peak - before) / 1e6:>16.0f} {step * 1000:>8.0f} "
                  f"{train_batch * train_block / step:>6.0f}", flush=True)


def write_corpus(folder, megabytes, seed=0):
    """megabytes of FineWeb-shaped .jsonl files ({"text": ...} records of a few paragraphs of English-like words),
    100 MB a file."""
    import json
    import random
    rng = random.Random(seed)
    words = ("the of and to in is was for that on with as by at from his it an were are which be this has also "
             "not first one new their after its had who two years all time been but or more other city world over "
             "where when music river country during state most through school government between because history "
             "people under season university number family system series large known water later made end").split()
    folder.mkdir(parents=True, exist_ok=True)
    written, n = 0, 0
    while written < megabytes * 1e6:
        with open(folder / f"part_{n:03d}.jsonl", "w") as f:
            size = 0
            while size < 100e6 and written + size < megabytes * 1e6:
                text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))).capitalize() + "."
                                   for _ in range(rng.randint(1, 6)))
                line = json.dumps({"text": text, "id": f"doc{n}-{size}"}) + "\n"
                f.write(line)
                size += len(line)
        written, n = written + size, n + 1
    return written


def bench_prepare():
    """Preparing a text corpus larger than memory would like: throughput in MB/s against tiktoken's own speed
    (one encode_ordinary call on one core, the same text), and the peak memory of the prepare.py process against
    that of a process that has only loaded the tokenizer."""
    import subprocess
    import sys
    import tiktoken
    folder = Path(tempfile.mkdtemp(prefix="nanoft-corpus-"))
    try:
        size = write_corpus(folder / "corpus", corpus_mb)
        sample = (folder / "corpus" / "part_000.jsonl").read_text()[:20_000_000]
        enc = tiktoken.get_encoding("gpt2")
        start = time.perf_counter()
        enc.encode_ordinary(sample)
        single = len(sample.encode()) / (time.perf_counter() - start)
        peak = "import resource, sys; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
        alone = subprocess.run([sys.executable, "-c", f"import tiktoken; tiktoken.get_encoding('gpt2'); {peak}"],
                               capture_output=True, text=True)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", f"import runpy, sys; sys.argv = ['prepare.py', "
                              f"'--dataset={folder / 'corpus'}', '--data_dir={folder / 'data'}']; "
                              f"runpy.run_path('prepare.py', run_name='__main__'); {peak}"],
                             capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if run.returncode:
            raise SystemExit(run.stderr)
        rss, tok_rss = int(run.stderr.split()[-1]) * 1024, int(alone.stderr.split()[-1]) * 1024
        print(f"prepare: {size / 1e6:,.0f} MB of text-field .jsonl ({len(list((folder / 'corpus').iterdir()))} "
              f"files) into shards, {os.cpu_count()} cores, torch threads unused")
        print(f"  {seconds:.1f} s: {size / 1e6 / seconds:.1f} MB/s, {size / seconds / single:.2f}x tiktoken's single "
              f"encode_ordinary call ({single / 1e6:.1f} MB/s on 20 MB of the same text)")
        print(f"  peak memory {rss / 1e6:,.0f} MB; a process with only the tokenizer loaded: {tok_rss / 1e6:,.0f} MB; "
              f"the difference: {(rss - tok_rss) / 1e6:,.0f} MB")
        print("\n".join(run.stdout.splitlines()[-4:]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    from configurator import configure, fail
    configure(globals())
    if threads:
        torch.set_num_threads(threads)
    benchmarks = {"train": bench_train, "lora": bench_lora, "prepare": bench_prepare}
    if what not in benchmarks:
        fail(f"what='{what}' is not a benchmark here: choose one of {', '.join(benchmarks)}")
    benchmarks[what]()
