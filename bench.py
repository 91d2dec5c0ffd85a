"""
Benchmarks, run by hand (none of them is a test). Pick one with --what:

    python bench.py                      # what=generate: tokens/s of sample.py's generation vs transformers
    python bench.py --models="('gpt2',)" --new_tokens="(128,)" --settings="('fp32', 'int8+compile')"
    python bench.py --what=int8          # fp32 vs bf16 vs int8 generation: speed, memory, quality
    python bench.py --what=serve         # serve.py: 8 clients at once vs the same 8 requests one by one
    python bench.py --what=eval --eval_model=out/instruction-data/ckpt.pt   # val/test loss, answers: then and now

Training and data preparation are measured by bench_train.py.

generate: batch 1, a 32-token prompt, greedy, random-init weights of the GPT-2 configs (nothing is downloaded),
ours and transformers' generate(do_sample=False, use_cache=True) on the same weights, interleaved; each figure
is the best of `repeats` runs. Next to them, the floor: the bytes of weights a decode step reads, divided by
the memory bandwidth measured in the same run (decoding one token is a matrix-vector product per weight).
"""

import os
import shutil
import statistics
import tempfile
import time

import torch

from generation import cpu_name
from load_gpt2 import build, config_from_hf, hf_to_ours
from model import GPT, PRESETS, GPTConfig
from quantize import choose_decode_kernel, kernel_line, model_bytes, ready_for_generation

# -----------------------------------------------------------------------------
what = "generate"  # which benchmark: generate, int8, serve, eval
models = ("gpt2", "gpt2-medium")  # GPT-2 configs
prompt_len = 32  # tokens of the random prompt each generation starts from
new_tokens = (128, 512)  # what=generate: new tokens per run, one row per value
settings = ("fp32", "fp32+compile", "bf16", "int8", "int8+compile")  # ours: dtype or int8, +compile
repeats = 1  # runs per figure, the best counts (other programs on the machine only ever slow a run down)
threads = 0  # torch threads; 0: torch's default (one per core)
seed = 1337  # the random weights and prompts
precisions = ("fp32", "bf16", "int8")  # what=int8: weights as sample.py runs them, compared with fp32
quality_prompts = 4  # what=int8: random prompts, each continued by quality_tokens greedy tokens
quality_tokens = 256  # what=int8: greedy tokens per prompt
serve_model = "gpt2"  # what=serve: the GPT-2 config served by serve.py (random-init weights, nothing downloaded)
serve_clients = 8  # what=serve: clients sending at once, against the same requests sent one after another
serve_tokens = 64  # what=serve: new tokens per request (greedy, after a prompt_len-token prompt)
serve_rounds = 3  # what=serve: rounds of each, interleaved; latencies are counted over every request
eval_model = "gpt2"  # what=eval: a GPT-2 config (random-init weights) or a model to load (finetune.py's ckpt.pt)
eval_data = "data/instruction-data"  # what=eval: a prepare.py instruction dataset folder (its val and test splits)
eval_tokens = 256  # what=eval: the most new tokens of an answer (finetune.py's and evaluate.py's default)
eval_precisions = ("fp32", "bf16")  # what=eval: fp32 as evaluate.py runs on the CPU, bf16 as finetune.py's autocast
eval_loss_runs = 3  # what=eval: runs of each loss, interleaved, the fastest counts (the answers run once each)
eval_mask_prompt = False  # what=eval: the losses score the responses only, as finetune.py --mask_prompt=True does
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
    print(f"generation: batch 1, {prompt_len}-token prompt, greedy, best of {repeats}; {cpu_name()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; memory bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(reading 1 GB, measured now); floor = bandwidth / weight bytes a decode step reads")
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
            if setting.startswith("fp32"):  # measured once per process and model shape: the same choice here
                print(f"({name} {setting}: {kernel_line(*choose_decode_kernel(ours[setting]))})")
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
    share = other_cpu_use(start_stat, start_own)
    if share is not None and share > 0.05:
        print(f"note: other processes took {share:.0%} of the CPU during this run; figures are best-of-{repeats}")



@torch.no_grad()
def bench_int8():
    """fp32 vs bf16 vs int8 weights in generation (batch 1, greedy) on random-init GPT-2-sized models: tokens/s,
    the weights' memory, and the quality cost against fp32: mean |logit difference| and how often the greedy
    token is the same, both read at every position of fp32's own greedy continuation (teacher forcing), and the
    share of positions where the free-running outputs are identical."""
    import copy
    print(f"precision: batch 1, {quality_prompts} random {prompt_len}-token prompts x {quality_tokens} greedy tokens, "
          f"random-init weights; {cpu_name()}, {torch.get_num_threads()} threads; quality against fp32 on fp32's "
          f"continuation")
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


def bench_eval():
    """finetune.py's evaluation of an instruction dataset on one model, as it runs now and as the first round ran
    it, one after the other, with today's model.py:
    - val and test loss: now evaluate_loss (batches of similar length, the head only on the scored positions);
      then batches of 8 in file order, the model's full logits (and the mean of per-batch means, printed beside);
    - the test answers (test_responses.json; evaluate.py's answers): now generation.answer (rows refilled as
      answers end; in float32 evaluate.py's decode kernel chosen for its rows); then batches of 8 prompts in file
      order through model.generate, each batch run until its longest answer ends (the first round split float32
      Linears' rows too: the kernel is chosen for 8 rows). Greedy both, so the answers are compared."""
    from contextlib import nullcontext
    from configurator import fail
    from data import EOT, Split
    from download import DownloadError
    from generation import PIECE_ROWS, answer, answer_rows, left_pad, piece_key, piece_rows, until_eot
    from load_gpt2 import load_model
    from training import Run, evaluate_loss
    if eval_tokens < 1 or eval_loss_runs < 1:
        fail(f"eval_tokens={eval_tokens} and eval_loss_runs={eval_loss_runs} must both be at least 1")
    torch.manual_seed(seed)
    try:
        gpt = GPT(GPTConfig.from_name(eval_model)) if eval_model in PRESETS else load_model(eval_model)[0]
        splits = {name: Split(eval_data, name) for name in ("val", "test")}
    except (ValueError, OSError, DownloadError) as e:
        fail(f"what=eval: {e}")
    gpt.eval()
    prompts = [splits["test"].prompt(i)[-(gpt.config.block_size - 1):] for i in range(len(splits["test"]))]

    def loss_then(split, amp):
        losses = []
        for i in range(0, len(split), 8):
            x, y = split.batch(range(i, min(i + 8, len(split))), eval_mask_prompt, "cpu")
            with amp:
                losses.append(gpt(x, y)[1].item())
        return sum(losses) / len(losses)

    def answers_then(amp):
        choose_decode_kernel(gpt, 8)
        answers = []
        for i in range(0, len(prompts), 8):
            idx, valid = left_pad(prompts[i:i + 8], "cpu")
            with amp:
                out = gpt.generate(idx, eval_tokens, temperature=0, eos_id=EOT, valid=valid)
            answers += [until_eot(row) for row in out[:, idx.size(1):].tolist()]
        return answers

    def answers_now(amp):
        if isinstance(amp, nullcontext):  # evaluate.py's float32 answers
            rows = answer_rows(gpt, prompts, eval_tokens)
            print(f"  (fp32 answers now: {kernel_line(*choose_decode_kernel(gpt, rows), rows)})")
        return answer(gpt, prompts, eval_tokens, amp)

    print(f"evaluation: {eval_model} ({gpt.num_params() / 1e6:.0f}M), {eval_data}: {len(splits['val'])} val and "
          f"{len(prompts)} test examples, losses on {'the responses' if eval_mask_prompt else 'every token'}, "
          f"answers of at most {eval_tokens} greedy tokens; "
          f"{torch.get_num_threads()} threads; {cpu_name()}; memory bandwidth {memory_bandwidth() / 1e9:.1f} GB/s")
    with torch.no_grad():
        answer(gpt, prompts[:4], 8)  # warm up: the first run in a process pays for allocating its memory
    print(f"  {'precision':<10} {'what':<13} {'first round':>11} {'now':>8} {'speed-up':>9}  "
          f"results (first round; now)")
    for precision in eval_precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        run = Run(0, 1, False, "cpu", dtype)
        jobs = [(f"{name} loss", lambda split=split: loss_then(split, run.autocast),
                 lambda split=split: evaluate_loss(gpt, split.eval_batches(8, 0, eval_mask_prompt), run))
                for name, split in splits.items()]
        jobs.append(("test answers", lambda: answers_then(run.autocast), lambda: answers_now(run.autocast)))
        for what_, then, now in jobs:
            seconds, results = [float("inf")] * 2, [None] * 2
            for _ in range(eval_loss_runs if what_.endswith("loss") else 1):
                for i, job in enumerate((then, now)):
                    start = time.perf_counter()
                    with torch.no_grad():
                        results[i] = job()
                    seconds[i] = min(seconds[i], time.perf_counter() - start)
            if what_ == "test answers":
                same = sum(a == b for a, b in zip(*results))
                told = f"{sum(map(len, results[1]))} tokens, {same}/{len(prompts)} answers the same"
            else:
                told = f"{results[0]:.4f} (a mean of batch means); {results[1]:.4f} (per token)"
            print(f"  {precision:<10} {what_:<13} {seconds[0]:>10.1f}s {seconds[1]:>7.1f}s "
                  f"{seconds[0] / seconds[1]:>8.2f}x  {told}")
        pieces = piece_rows.get(piece_key(gpt, "cpu", dtype or torch.float32))
        how = (f"{pieces} rows at a time, the fastest of {PIECE_ROWS} timed on the first rows scored" if pieces else
               f"{PIECE_ROWS[0]} rows at a time (too few rows were scored to time the sizes)")
        print(f"  ({precision} losses now: the head's logits {how})")


if __name__ == "__main__":
    from configurator import configure, fail
    configure(globals())
    if threads:
        torch.set_num_threads(threads)
    benchmarks = {"generate": bench_generate, "int8": bench_int8, "serve": bench_serve, "eval": bench_eval}
    if what not in benchmarks:
        fail(f"what='{what}' is not a benchmark: choose one of {', '.join(benchmarks)}")
    benchmarks[what]()
