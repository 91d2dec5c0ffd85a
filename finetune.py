"""
Instruction fine-tuning of GPT-2, end to end: prepares the data and downloads the weights if needed, trains,
evaluates (val loss and sample answers), and leaves a checkpoint that sample.py can chat with.

    python finetune.py                                                  # gpt2 on Stanford Alpaca
    python finetune.py --model=gpt2-medium --dataset=instruction-data   # "Build a LLM from scratch" ch07
    torchrun --nproc_per_node=4 finetune.py ...                         # DDP on 4 GPUs
"""

import ctypes
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import LORA_CHOICES, PRESETS, add_lora, check_lora_targets

# -----------------------------------------------------------------------------
model = "gpt2"  # a GPT-2 name, a Hugging Face folder, a .safetensors file or a previous run's ckpt.pt
dataset = "alpaca"  # a prepare.py dataset name, or a path/URL to an Alpaca-format .json/.jsonl file
data_dir = "data"
out_dir = ""  # default: out/<dataset>
epochs = 2
max_iters = 0  # if > 0, train this many optimizer steps instead of `epochs`
batch_size = 8  # examples per micro-batch (per process)
grad_accum = 1  # micro-batches per optimizer step
global_batch_size = 0  # if > 0, grad_accum is derived: global_batch_size / (batch_size * processes)
lr = 5e-5
min_lr = 5e-6  # the cosine schedule ends here
warmup_iters = 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
dropout = 0.0
mask_prompt = False  # True: train on the response tokens only
max_length = 1024  # longer examples are dropped by prepare
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 0  # val batches per evaluation; 0 = the whole val split
eval_prompts = 3  # val examples answered greedily at every evaluation
log_interval = 10
max_new_tokens = 256  # for the sample answers and test_responses.json
test_responses = True  # at the end, answer every test example into out_dir/test_responses.json
seed = 1337
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto, bfloat16, float16 or float32 (float32 turns autocast off)
compile = "auto"  # auto: on for CUDA only; True / False
resume = False  # continue from out_dir/ckpt.pt
grad_checkpoint = False  # recompute activations in backward: less memory, ~30% more compute
lora_rank = 0  # > 0: train LoRA adapters of this rank only, every weight of the model frozen; 0: train it all
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj,head"  # also attn.c_attn (q/k/v as one); head = lm_head
wandb_log = False
wandb_project = "nanoft"
# -----------------------------------------------------------------------------

IGNORE = -100  # the target value that carries no loss (PyTorch's and Hugging Face's default)
EOT = 50256  # <|endoftext|>, also the padding token


# ----------------------------------------------------------------------------- batching

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


class Split:
    """One prepared split: examples read straight from prepare.py's memory-mapped arrays."""

    def __init__(self, folder, name):
        from prepare import load_split
        self.arrays = load_split(folder, name)
        self.offsets = self.arrays["offsets"]
        self.lengths = np.diff(self.offsets)

    def __len__(self):
        return len(self.lengths)

    def example(self, i):
        tokens = self.arrays["tokens"][self.offsets[i]:self.offsets[i + 1]]
        return tokens, int(self.arrays["prompt_len"][i])

    def batch(self, indices, mask_prompt, device):
        return collate([self.example(i) for i in indices], mask_prompt, device=device)


# ----------------------------------------------------------------------------- machinery (also used by classify.py)

def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default every block over 32 MB is a fresh mmap, and a training step frees and re-allocates GBs of
    them (logits alone are 200 MB at 4 x 256 tokens), so each step page-faults all of that memory in again:
    copying a 200 MB tensor took 100 ms instead of 15 ms here. tcmalloc fixes the same thing.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: large blocks come from the heap, so they can be reused
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        pass


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def pick_dtype(name, device_type):
    """The autocast dtype (None = full fp32): bf16 where the hardware has it, else fp16 on GPUs."""
    if name != "auto":
        return None if name == "float32" else getattr(torch, name)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "mps":
        return torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def setup_distributed():
    """(rank, world_size, is_ddp) from torchrun's environment; joins the process group if there is one."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), True


def start_run(device, dtype):
    """What every training run starts with: malloc settings, the process group (under torchrun), the device and
    autocast. Returns (rank, world, ddp, device, device type, autocast dtype or None, autocast context)."""
    keep_freed_memory()
    rank, world, ddp = setup_distributed()
    return (rank, world, ddp, *device_and_autocast(device, dtype))


def device_and_autocast(device, dtype):
    """(device, device type, autocast dtype or None, autocast context) for the device and dtype settings."""
    dev = pick_device(device)
    device_type = dev.split(":")[0]
    amp_dtype = pick_dtype(dtype, device_type)
    return dev, device_type, amp_dtype, torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else nullcontext()


def prepare_once(dataset, ddp, master, **kwargs):
    """prepare.prepare(dataset, **kwargs) on rank 0 (download, tokenize) while the other processes wait;
    then every process reads the same folder."""
    from prepare import prepare
    folder = prepare(dataset, **kwargs) if master else None
    if ddp:
        dist.barrier()
    return folder or prepare(dataset, **kwargs)


def check_machinery(c):
    """The problems with the settings every training script shares (dropout, dtype, compile)."""
    problems = [] if 0 <= c["dropout"] < 1 else [f"dropout={c['dropout']} must be in [0, 1)"]
    if c["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dtype='{c['dtype']}' must be auto, float32, bfloat16 or float16")
    if str(c["compile"]).lower() not in ("auto", "true", "false", "1", "0"):
        problems.append(f"compile='{c['compile']}' must be auto, True or False")
    if c["lora_rank"] < 0:
        problems.append(f"lora_rank={c['lora_rank']} must be 0 (off) or a rank of at least 1")
    if c["lora_rank"] > 0:
        if c["lora_alpha"] <= 0:
            problems.append(f"lora_alpha={c['lora_alpha']} must be positive")
        if not 0 <= c["lora_dropout"] < 1:
            problems.append(f"lora_dropout={c['lora_dropout']} must be in [0, 1)")
        try:
            check_lora_targets(lora_settings(c)["targets"])
        except ValueError as e:
            problems.append(f"lora_targets='{c['lora_targets']}': {e}")
    return problems


def lora_settings(c):
    """The LoRA settings a checkpoint records (add_lora's arguments), or None for training every weight."""
    if c["lora_rank"] <= 0:
        return None
    given = {t.strip() for t in c["lora_targets"].split(",") if t.strip()}
    order = {t: i for i, t in enumerate(LORA_CHOICES)}  # one order, so 'v,q' resumes a run saved as 'q,v'
    return {"rank": c["lora_rank"], "alpha": float(c["lora_alpha"]), "dropout": c["lora_dropout"],
            "targets": sorted(given, key=lambda t: (order.get(t, len(order)), t))}


def trainable_line(model, lora, otherwise="every weight"):
    """'7,898,384 of 362,721,552 parameters trainable (2.18%; LoRA rank 16, ...)' for the first printout."""
    params = list(model.parameters())  # each tied tensor once
    n_train, n_all = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    how = f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g} on {','.join(lora['targets'])}" if lora else otherwise
    return f"{n_train:,} of {n_all:,} parameters trainable ({100 * n_train / n_all:.3g}%; {how})"


def make_optimizer(model, lr, weight_decay, betas, device_type):
    # the fused AdamW is one kernel for all parameters: ~5x faster than the default on CPU too
    fused = device_type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(model.optim_groups(weight_decay), lr=lr, betas=betas, fused=fused)


def optimizer_step(optimizer, scaler, model, grad_clip):
    """Unscale the gradients (fp16's scaler), clip their norm to grad_clip (0: no clipping), step, clear them."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def lr_at(it, total, lr, min_lr, warmup):
    """Linear warmup, then cosine decay from lr to min_lr at the last iteration."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def start_log(out, resume, start_iter):
    """Make out_dir; return the log to go on with: after a resume, the records of its log.jsonl up to the
    checkpoint's iteration (what came after is redone), else none."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "log.jsonl"
    if not resume or not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["iter"] <= start_iter]


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write never leaves a broken checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    # data order comes from seeded numpy generators; only torch's RNG (dropout) carries state
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class StopOnSigint:
    """Ctrl-C sets a flag; the loop finishes its step, saves a checkpoint and exits."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop right away
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)", flush=True)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_loss(model, split, batch_size, max_batches, mask_prompt, device, ctx, rank=0, world=1):
    """Mean of per-batch mean losses over the split (its first max_batches batches; 0 = all), every
    process taking its share of the batches."""
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(split)))) for i in range(0, len(split), batch_size)]
    batches = batches[:max_batches] if max_batches else batches
    total = torch.zeros(2, device=device)
    for indices in batches[rank::world]:
        x, y = split.batch(indices, mask_prompt, device)
        with ctx:
            _, loss = model(x, y)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item() if total[1] else float("nan")


@torch.no_grad()
def answer(model, prompts, max_new_tokens, device, ctx, batch_size=8):
    """Greedy answers (token lists, without the end-of-text) to prompts (token lists), batched with left
    padding; greedy outputs of a batch equal those of each prompt alone."""
    model.eval()
    answers = []
    for i in range(0, len(prompts), batch_size):
        group = [list(p[-(model.config.block_size - 1):]) for p in prompts[i:i + batch_size]]
        width = max(map(len, group))
        idx = torch.tensor([[EOT] * (width - len(p)) + p for p in group], device=device)
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in group], device=device)
        with ctx:
            out = model.generate(idx, max_new_tokens, temperature=0, eos_id=EOT, valid=valid)
        for row in out[:, width:].tolist():
            answers.append(row[:row.index(EOT)] if EOT in row else row)
    model.train()
    return answers


def show_answers(model, split, n, max_new_tokens, device, ctx, enc):
    prompts = [split.example(i)[0][:split.example(i)[1]].tolist() for i in range(min(n, len(split)))]
    shown = []
    for prompt, ids in zip(prompts, answer(model, prompts, max_new_tokens, device, ctx)):
        text = enc.decode(ids).strip()
        instruction = enc.decode(prompt).rsplit("### Instruction:\n", 1)[-1].split("\n\n###")[0]
        print(f"  > {instruction[:100]}\n    {text[:300]!r}")
        shown.append({"instruction": instruction, "response": text})
    return shown


def write_test_responses(model, split, folder, out, max_new_tokens, device, ctx, enc):
    from prepare import load_records
    records = load_records(folder, "test")
    prompts = [split.example(i)[0][:split.example(i)[1]].tolist() for i in range(len(split))]
    t0 = time.time()
    answers = answer(model, prompts, max_new_tokens, device, ctx)
    results = [{**record, "model_response": enc.decode(ids).strip()} for record, ids in zip(records, answers)]
    (out / "test_responses.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {len(results)} answers to {out / 'test_responses.json'} in {time.time() - t0:.0f}s")


def plot_losses(log, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train = [(r["iter"], r["loss"]) for r in log if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in log if "val_loss" in r]
    plt.figure(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "val")):
        if points:
            plt.plot(*zip(*points), label=label)
    plt.xlabel("iteration"), plt.ylabel("loss"), plt.legend(), plt.tight_layout()
    plt.savefig(path)
    plt.close()


# ----------------------------------------------------------------------------- the run

def check_settings(config):
    """Catch impossible values before anything is loaded; returns the list of problems."""
    c = config
    problems = [f"{k}={c[k]} must be at least 1" for k in ("batch_size", "grad_accum", "log_interval",
                                                          "eval_interval") if c[k] < 1]
    problems += [f"{k}={c[k]} must not be negative" for k in ("lr", "min_lr", "weight_decay", "grad_clip",
                                                             "warmup_iters", "max_iters", "eval_iters",
                                                             "global_batch_size") if c[k] < 0]
    if c["max_iters"] == 0 and c["epochs"] < 1:
        problems.append(f"epochs={c['epochs']} must be at least 1 (or set max_iters)")
    return problems + check_machinery(c)


def resolve_compile(value, device_type):
    value = str(value).lower()
    return device_type == "cuda" if value == "auto" else value in ("true", "1")


def main(config):
    from configurator import fail
    from load_gpt2 import DownloadError, load_gpt2
    import tiktoken

    problems = check_settings(config)
    if problems:
        fail("; ".join(problems))
    rank, world, ddp, dev, device_type, amp_dtype, ctx = start_run(device, dtype)
    master = rank == 0
    accum = grad_accum
    if global_batch_size:
        accum, rest = divmod(global_batch_size, batch_size * world)
        if rest or not accum:
            fail(f"global_batch_size={global_batch_size} is not a multiple of batch_size * processes "
                 f"= {batch_size} * {world}")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # data: rank 0 prepares (downloads, tokenizes) while the others wait, then all read the same files
    try:
        folder = prepare_once(dataset, ddp, master, data_dir=data_dir, seed=seed, max_length=max_length)
    except (ValueError, OSError, DownloadError) as e:
        fail(f"dataset '{dataset}': {e}")
    meta = json.loads((folder / "meta.json").read_text())
    if meta["kind"] != "instruction":
        fail(f"dataset '{dataset}' is a {meta['kind']} dataset; finetune.py trains on instruction data "
             f"(use classify.py for classification)")
    train, val, test = (Split(folder, s) for s in ("train", "val", "test"))
    out = Path(out_dir or Path("out") / folder.name)

    # model: fresh from `model`, or everything from out_dir/ckpt.pt when resuming
    ckpt_path = out / "ckpt.pt"
    if resume and not ckpt_path.exists():
        fail(f"resume=True but there is no checkpoint at {ckpt_path}; run without resume to start a new run")
    lora = lora_settings(config)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True) if resume else None
    except Exception as e:
        fail(f"could not read {ckpt_path} to resume ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
             f"run without resume=True, or with another out_dir, to start a new run")
    if ckpt is not None and not (isinstance(ckpt, dict) and {"model_config", "optimizer"} <= ckpt.keys()):
        fail(f"{ckpt_path} is not a checkpoint of finetune.py: it cannot be resumed; use another out_dir")
    if ckpt and model in PRESETS and any(ckpt["model_config"][k] != v for k, v in PRESETS[model].items()):
        saved = ckpt["model_config"]
        fail(f"{ckpt_path} holds a model with n_layer={saved['n_layer']}, n_embd={saved['n_embd']}, not "
             f"{model}: resume with the --model it was trained from, or use another out_dir")
    if ckpt and ckpt.get("lora") != lora:
        fail(f"{ckpt_path} was trained with LoRA settings {ckpt.get('lora')}, not {lora}: resume with the same "
             f"lora_* settings, or use another out_dir")
    try:  # a LoRA run resumes with its adapters unmerged
        raw = load_gpt2(ckpt_path if resume else model, device=dev, dropout=dropout, merge_lora=not resume)
    except Exception as e:  # downloads, hostile or mismatched files: all explained in the message
        fail(f"could not load model '{ckpt_path if resume else model}': {e}")
    if lora and not resume:
        add_lora(raw, **lora)
    raw.grad_checkpoint = grad_checkpoint
    raw.train()
    optimizer = make_optimizer(raw, lr, weight_decay, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
    start_iter, best_val = 0, float("inf")
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"])
    net = torch.compile(raw) if resolve_compile(compile, device_type) else raw
    if ddp:
        net = DDP(net, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)

    # schedule: every process walks the same seeded batch order and takes every world-th micro-batch
    steps_per_epoch = len(length_grouped_batches(train.lengths, batch_size, seed, 0)) // (accum * world)
    if steps_per_epoch == 0:
        fail(f"the train split has {len(train)} examples: too few for batch_size={batch_size} x grad_accum="
             f"{accum} x {world} processes")
    total_iters = max_iters or epochs * steps_per_epoch
    enc = tiktoken.get_encoding("gpt2")
    log, wandb = [], None
    if master:
        grouped = length_grouped_batches(train.lengths, batch_size, seed, 0)
        shuffled = np.array_split(np.random.default_rng(seed).permutation(len(train)), len(grouped))
        log = start_log(out, resume, start_iter)
        print(f"{trainable_line(raw, lora)} on {dev}, autocast {amp_dtype}, {world} process(es); "
              f"{len(train)} train / {len(val)} val / {len(test)} test examples; {total_iters} iterations of "
              f"{batch_size * accum * world} examples; padding is {padding_fraction(grouped, train.lengths):.1%} "
              f"of tokens with length grouping ({padding_fraction(shuffled, train.lengths):.1%} without)")
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, config=config)

    def write_log(record):
        log.append(record)
        with open(out / "log.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
        if wandb:
            wandb.log(record, step=record["iter"])

    def save(path, it):
        save_atomic({"model": raw.state_dict(), "model_config": asdict(raw.config), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "iter_num": it, "best_val_loss": best_val, "rng": rng_state(),
                     "config": config, "meta": meta, "template": meta.get("template"), "lora": lora}, path)

    stop = StopOnSigint()
    epoch_batches, it, t_last, last_logged, dt_avg, tokens = {}, start_iter, time.time(), start_iter, None, 0
    while it < total_iters:
        epoch, step = divmod(it, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: length_grouped_batches(train.lengths, batch_size, seed, epoch)}
        lr_now = lr_at(it, total_iters, lr, min_lr, warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss_sum = torch.zeros((), device=dev)
        for micro in range(accum):
            x, y = train.batch(epoch_batches[epoch][(step * accum + micro) * world + rank], mask_prompt, dev)
            if ddp:  # gradients are averaged across processes only at the last micro-batch
                net.require_backward_grad_sync = micro == accum - 1
            with ctx:
                _, loss = net(x, y)
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
            tokens += x.numel() * world
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            last = f"the last checkpoint, {ckpt_path}, is from before it" if ckpt_path.exists() else "no checkpoint was written"
            fail(f"the loss became {loss_value} at iteration {it}: lower lr (now {lr}), use dtype=bfloat16 or "
                 f"float32 instead of float16, or lower grad_clip; {last}", status=1)
        optimizer_step(optimizer, scaler, raw, grad_clip)
        it += 1

        if master and (it % log_interval == 0 or it in (start_iter + 1, total_iters)):  # the first at once
            now = time.time()
            dt = (now - t_last) / (it - last_logged)
            dt_avg = dt if dt_avg is None else 0.7 * dt_avg + 0.3 * dt
            eta = dt_avg * (total_iters - it)
            print(f"iter {it}/{total_iters} | epoch {it / steps_per_epoch:.2f} | loss {loss_value:.4f} | lr {lr_now:.2e} "
                  f"| {tokens / (now - t_last):.0f} tok/s | {dt * 1000:.0f} ms/iter | ETA {eta // 60:.0f}m{eta % 60:02.0f}s",
                  flush=True)
            write_log({"iter": it, "epoch": it / steps_per_epoch, "loss": loss_value, "lr": lr_now,
                       "tokens_per_s": tokens / (now - t_last), "ms_per_iter": dt * 1000})
            t_last, last_logged, tokens = time.time(), it, 0
        if it % eval_interval == 0 or it == total_iters:
            val_loss = evaluate_loss(net, val, batch_size, eval_iters, mask_prompt, dev, ctx, rank, world)
            if master:
                print(f"iter {it}: val loss {val_loss:.4f}")
                answers = show_answers(raw, val, eval_prompts, min(max_new_tokens, 64), dev, ctx, enc)
                write_log({"iter": it, "val_loss": val_loss, "answers": answers})
                if val_loss < best_val:
                    best_val = val_loss
                    save(out / "best.pt", it)
                save(ckpt_path, it)
            t_last, last_logged, tokens = time.time(), it, 0  # evaluation time is not training time
        if stop.requested:
            if master:
                save(ckpt_path, it)
                print(f"saved {ckpt_path} at iteration {it}; continue with --resume=True")
            sys.exit(130)

    test_loss = evaluate_loss(net, test, batch_size, 0, mask_prompt, dev, ctx, rank, world)
    if master:
        print(f"test loss {test_loss:.4f} (best val loss {best_val:.4f})")
        write_log({"iter": it, "test_loss": test_loss})
        if test_responses:
            write_test_responses(raw, test, folder, out, max_new_tokens, dev, ctx, enc)
        plot_losses(log, out / "loss.png")
    if ddp:
        dist.barrier()  # nobody tears the group down while another process still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    from configurator import configure
    main(configure(globals()))
