"""
Benchmarks, run by hand (none of them is a test). Pick one with --what:

    python bench.py                      # what=generate: tokens/s of sample.py's generation vs transformers
    python bench.py --models="('gpt2',)" --new_tokens="(128,)" --settings="('fp32', 'int8+compile')"
    python bench.py --what=train         # tokens/s of a full training step vs transformers
    python bench.py --what=int8          # fp32 vs bf16 vs int8 generation: speed, memory, quality
    python bench.py --what=lora          # full fine-tuning vs LoRA: peak memory and speed of a step
    python bench.py --what=serve         # serve.py: 8 clients at once vs the same 8 requests one by one

generate: batch 1, a 32-token prompt, greedy, random-init weights of the GPT-2 configs (nothing is downloaded),
ours and transformers' generate(do_sample=False, use_cache=True) on the same weights, interleaved; each figure
is the best of `repeats` runs. Next to them, the floor: the bytes of weights a decode step reads, divided by
the memory bandwidth measured in the same run (decoding one token is a matrix-vector product per weight).

train: one full step (forward, backward, fused AdamW) on the gpt2 (124M) config at train_batch x train_block
tokens, ours and transformers' GPT2LMHeadModel on the same weights, both with bf16 autocast and fused AdamW (the
best the reference does on this CPU), interleaved; the median of train_rounds steps. The reference runs twice: in
this process, where it gets the malloc settings finetune.py makes (keep_freed_memory), and in a process of its own
with glibc's defaults, as `python train.py` with transformers runs (there it is about twice as slow).
"""

import os
import shutil
import statistics
import tempfile
import time

import torch

from load_gpt2 import build, config_from_hf, hf_to_ours
from model import GPT, PRESETS, GPTConfig
from quantize import ready_for_generation

# -----------------------------------------------------------------------------
what = "generate"  # which benchmark: generate, train, int8, lora, serve
models = ("gpt2", "gpt2-medium")  # GPT-2 configs
prompt_len = 32  # tokens of the random prompt each generation starts from
new_tokens = (128, 512)  # what=generate: new tokens per run, one row per value
settings = ("fp32", "fp32+compile", "bf16", "int8", "int8+compile")  # ours: dtype or int8, +compile
repeats = 1  # runs per figure, the best counts (other programs on the machine only ever slow a run down)
threads = 0  # torch threads; 0: torch's default (one per core)
seed = 1337  # the random weights and prompts
train_batch = 4  # what=train: examples of train_block tokens per step
train_block = 256  # what=train: tokens per example
train_rounds = 5  # timed steps per contender (the median counts)
train_compile = False  # also time our model under torch.compile (compiling takes a minute or two)
precisions = ("fp32", "bf16", "int8")  # what=int8: weights as sample.py runs them, compared with fp32
quality_prompts = 4  # what=int8: random prompts, each continued by quality_tokens greedy tokens
quality_tokens = 256  # what=int8: greedy tokens per prompt
lora_rank = 16  # what=lora: LoRA on the book's targets (finetune.py's default lora_targets)
serve_model = "gpt2"  # what=serve: the GPT-2 config served by serve.py (random-init weights, nothing downloaded)
serve_clients = 8  # what=serve: clients sending at once, against the same requests sent one after another
serve_tokens = 64  # what=serve: new tokens per request (greedy, after a prompt_len-token prompt)
serve_rounds = 3  # what=serve: rounds of each, interleaved; latencies are counted over every request
# -----------------------------------------------------------------------------


def memory_bandwidth(size_mb=1024, runs=5):
    """Bytes/s of reading a tensor far larger than the caches: what a decode step does with the weights."""
    x = torch.ones(size_mb * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def model_bytes(gpt):
    """Memory the model's weights take: every parameter and buffer, tied tensors once."""
    tensors = {id(t): t for t in [*gpt.parameters(), *gpt.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_per_token(gpt):
    """The weights a decode step reads: every parameter and buffer once, except the embeddings, of which it reads
    a row (wte is read in full only while it is also the output layer)."""
    total = model_bytes(gpt)
    skipped = [gpt.wpe.weight] + ([gpt.wte.weight] if gpt.lm_head.weight is not gpt.wte.weight else [])
    return total - sum(t.numel() * t.element_size() for t in skipped)


def other_cpu_use(start_stat, start_own):
    """The share of the machine's CPU time that other processes took since the start (Linux only)."""
    try:
        busy = _cpu_jiffies() - start_stat
    except OSError:
        return None
    own = (sum(os.times()[:2]) - start_own) * os.sysconf("SC_CLK_TCK")
    return max(0.0, busy - own) / max(busy, 1)


def _cpu_jiffies():
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def ours_like(hf_model, setting):
    """Ours with the reference's weights, prepared the way sample.py prepares it for this setting."""
    config = config_from_hf(hf_model.config.to_dict())
    dtype = torch.bfloat16 if setting.startswith("bf16") else torch.float32
    gpt = build(config, hf_to_ours(hf_model.state_dict(), config), dtype=dtype)
    return ready_for_generation(gpt, "int8" if setting.startswith("int8") else "none", setting.endswith("+compile"))


def bench_generate():
    import transformers  # the reference, a test-only dependency (requirements-dev.txt)
    transformers.logging.set_verbosity_error()
    start_stat, start_own = _cpu_jiffies(), sum(os.times()[:2])
    bandwidth = memory_bandwidth()
    print(f"generation: batch 1, {prompt_len}-token prompt, greedy, best of {repeats}; {torch.get_num_threads()} "
          f"threads; torch {torch.__version__}; memory bandwidth {bandwidth / 1e9:.1f} GB/s (reading 1 GB, measured "
          f"now); floor = bandwidth / weight bytes a decode step reads")
    print(f"{'model':<12} {'new':>4}  {'setting':<14} {'tok/s':>6} {'ms/tok':>7} {'vs ref':>7} "
          f"{'MB/tok':>7} {'floor tok/s':>11} {'of floor':>8}  same tokens")
    for name in models:
        torch.manual_seed(seed)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**PRESETS[name])).eval()  # random init
        with torch.device("meta"):  # shapes only: the reference reads float32 weights, as GPT does
            fp32_bytes = bytes_per_token(GPT(config_from_hf(hf.config.to_dict())))
        ours = {}
        for setting in settings:
            start = time.perf_counter()
            ours[setting] = ours_like(hf, setting)
            ours[setting].generate(torch.zeros(1, prompt_len, dtype=torch.long), 4, temperature=0)  # warm up
            if setting.endswith("+compile"):
                print(f"({name} {setting}: ready in {time.perf_counter() - start:.0f} s, compiling included)")
        prompt = torch.randint(0, 50257, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        runs = {"transformers": lambda n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                      use_cache=True, max_new_tokens=n, min_new_tokens=n,
                                                      pad_token_id=50256)[0, prompt_len:]}
        for setting, gpt in ours.items():
            runs[setting] = lambda n, gpt=gpt: gpt.generate(prompt, n, temperature=0)[0, prompt_len:]
        for n in new_tokens:
            best, tokens = {k: 0.0 for k in runs}, {}
            with torch.inference_mode():
                for _ in range(repeats):
                    for key, run in runs.items():  # interleaved: a busy moment does not hit one setting only
                        start = time.perf_counter()
                        tokens[key] = run(n)
                        best[key] = max(best[key], n / (time.perf_counter() - start))
            for key in runs:
                weights = bytes_per_token(ours[key]) if key in ours else fp32_bytes
                floor = bandwidth / weights
                same = (tokens[key] == tokens["transformers"]).float().mean().item()
                print(f"{name:<12} {n:>4}  {key:<14} {best[key]:>6.1f} {1e3 / best[key]:>7.1f} "
                      f"{best[key] / best['transformers']:>6.2f}x {weights / 1e6:>7.0f} {floor:>11.1f} "
                      f"{best[key] / floor:>8.0%}  {same:.0%}", flush=True)
        del hf, ours
    share = other_cpu_use(start_stat, start_own)
    if share is not None and share > 0.05:
        print(f"note: other processes took {share:.0%} of the CPU during this run; figures are best-of-{repeats}")



def train_step(model, optimizer, x, y):
    """finetune.py's step: forward under bf16 autocast, backward, fused AdamW."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reference_train_setup(folder):
    """transformers' GPT2LMHeadModel (saved in folder) and its training step: bf16 autocast, fused AdamW."""
    import transformers
    from transformers import GPT2LMHeadModel
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ref = GPT2LMHeadModel.from_pretrained(folder).train()
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
    GPT2LMHeadModel(GPT2Config(n_positions=1024)).save_pretrained(folder)
    # started before this process changes its malloc settings; spawn: a fresh interpreter with glibc's defaults
    conn, child_conn = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=reference_train_process, args=(folder, child_conn))
    child.start()
    keep_freed_memory()  # what finetune.py does; the in-process reference gets it too
    ours = load_gpt2(folder).train()
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
    tokens = train_batch * train_block
    print(f"\ntraining step (forward, backward, AdamW), gpt2 (124M) config, batch {train_batch} x {train_block} "
          f"tokens, bf16 autocast, fused AdamW, {torch.get_num_threads()} threads, median of {train_rounds}")
    print(f"  {'':<48} {'ms/step':>8} {'tok/s':>7}  {'vs in-process':>13}  {'vs own process':>14}")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, took in medians.items():
        print(f"  {name:<48} {took * 1000:>8.0f} {tokens / took:>7.0f}  "
              f"{medians['transformers, in this process (malloc tuned)'] / took:>12.2f}x  "
              f"{medians['transformers, own process (malloc as is)'] / took:>13.2f}x")


@torch.no_grad()
def bench_int8():
    """fp32 vs bf16 vs int8 weights in generation (batch 1, greedy) on random-init GPT-2-sized models: tokens/s,
    the weights' memory, and the quality cost against fp32: mean |logit difference| and how often the greedy
    token is the same, both read at every position of fp32's own greedy continuation (teacher forcing), and the
    share of positions where the free-running outputs are identical."""
    import copy
    print(f"precision: batch 1, {quality_prompts} random {prompt_len}-token prompts x {quality_tokens} greedy tokens, "
          f"random-init weights, {torch.get_num_threads()} threads; quality against fp32 on fp32's continuation")
    print(f"{'model':<12} {'weights':<8} {'MB':>6} {'tok/s':>6} {'vs fp32':>7} {'mean |dlogit|':>13} "
          f"{'same greedy':>11} {'same text':>9}")
    for name in models:
        torch.manual_seed(seed)
        fp32 = GPT(GPTConfig.from_name(name)).eval()
        variants = {}
        for p in precisions:
            dtype = torch.bfloat16 if p.startswith("bf16") else torch.float32
            gpt = fp32 if p == "fp32" else copy.deepcopy(fp32).to(dtype)
            variants[p] = ready_for_generation(gpt, "int8" if p.startswith("int8") else "none", p.endswith("+compile"))
            variants[p].generate(torch.zeros(1, prompt_len, dtype=torch.long), 4, temperature=0)  # warm up (compile)
        prompts = torch.randint(0, 50257, (quality_prompts, prompt_len), generator=torch.Generator().manual_seed(seed))
        seconds, stats = dict.fromkeys(variants, 0.0), {p: [] for p in variants}
        for prompt in prompts[:, None, :]:
            texts = {}
            for p, gpt in variants.items():  # interleaved: a busy moment does not hit one setting only
                start = time.perf_counter()
                texts[p] = gpt.generate(prompt, quality_tokens, temperature=0)
                seconds[p] += time.perf_counter() - start
            reference = fp32(texts["fp32"])[0][0, prompt_len - 1:-1].float()  # the logits that chose each token
            for p, gpt in variants.items():
                logits = gpt(texts["fp32"])[0][0, prompt_len - 1:-1].float()
                stats[p].append(((logits - reference).abs().mean().item(),
                                 (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                                 (texts[p] == texts["fp32"])[0, prompt_len:].float().mean().item()))
        for p, gpt in variants.items():
            rate, dlogit, greedy, text = (quality_prompts * quality_tokens / seconds[p],
                                          *(statistics.mean(v) for v in zip(*stats[p])))
            base = quality_prompts * quality_tokens / seconds["fp32"]
            print(f"{name:<12} {p:<8} {model_bytes(gpt) / 1e6:>6.0f} {rate:>6.1f} {rate / base:>6.2f}x {dlogit:>13.4f} "
                  f"{greedy:>11.2%} {text:>9.2%}", flush=True)
        del fp32, variants


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


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "an unknown CPU"


def bench_serve():
    """serve.py as clients see it: total tokens/s of serve_clients requests sent at once (batched by the server)
    against the same requests sent one after another, and each request's latency (send to last byte). Random-init
    weights of serve_model; each request: serve_tokens greedy tokens after its own random prompt_len-token prompt."""
    import json
    import re
    import subprocess
    import sys
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from load_gpt2 import export_hf
    folder = tempfile.mkdtemp()
    torch.manual_seed(seed)
    export_hf(GPT(GPTConfig.from_name(serve_model)), folder)
    server = subprocess.Popen([sys.executable, "serve.py", f"--model={folder}", "--port=0",
                               f"--max_batch={serve_clients}"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              stderr=subprocess.PIPE, text=True)
    url = re.search(r"http://\S+:\d+/", server.stderr.readline()).group(0) + "v1/completions"
    threading.Thread(target=server.stderr.read, daemon=True).start()  # its request log: read, not shown
    prompts = torch.randint(0, 50257, (serve_clients, prompt_len), generator=torch.Generator().manual_seed(seed))

    def ask(prompt):
        body = json.dumps({"prompt": prompt.tolist(), "max_tokens": serve_tokens, "temperature": 0}).encode()
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"})) as r:
            tokens = json.load(r)["usage"]["completion_tokens"]
        return tokens, time.perf_counter() - start

    try:
        ask(prompts[0])  # warm up
        results = {"one after another": [], f"{serve_clients} at once": []}
        seconds = dict.fromkeys(results, 0.0)
        for _ in range(serve_rounds):  # interleaved: a busy moment hits both
            for name in results:
                start = time.perf_counter()
                if name == "one after another":
                    results[name] += [ask(p) for p in prompts]
                else:
                    with ThreadPoolExecutor(serve_clients) as pool:
                        results[name] += list(pool.map(ask, prompts))
                seconds[name] += time.perf_counter() - start
    finally:
        server.send_signal(2)  # Ctrl-C: serve.py stops gracefully
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"serve.py: {serve_model} (random-init, float32), {serve_clients} requests of {prompt_len}-token prompts x "
          f"{serve_tokens} greedy tokens, {serve_rounds} rounds; {torch.get_num_threads()} threads; {cpu_name()}")
    print(f"  {'requests':<20} {'tok/s':>7} {'vs one by one':>13} {'p50 latency':>12} {'p95 latency':>12}")
    base = sum(t for t, _ in results["one after another"]) / seconds["one after another"]
    for name, runs in results.items():
        rate = sum(t for t, _ in runs) / seconds[name]
        cuts = statistics.quantiles([s for _, s in runs], n=20)  # cuts[9]: the median, cuts[18]: the 95th percentile
        print(f"  {name:<20} {rate:>7.1f} {rate / base:>12.2f}x {cuts[9]:>11.2f}s {cuts[18]:>11.2f}s")


if __name__ == "__main__":
    from configurator import configure, fail
    configure(globals())
    if threads:
        torch.set_num_threads(threads)
    benchmarks = {"generate": bench_generate, "train": bench_train, "int8": bench_int8, "lora": bench_lora,
                  "serve": bench_serve}
    if what not in benchmarks:
        fail(f"what='{what}' is not a benchmark: choose one of {', '.join(benchmarks)}")
    benchmarks[what]()
