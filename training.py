"""
The training machinery finetune.py and classify.py share: run setup (device, autocast, DDP, malloc), the
optimizer and its schedule, compile and DDP wrapping, checkpoints with RNG state, Ctrl-C, the run log, plots.

    run = start_run(device="auto", dtype="auto")       # run.device, run.autocast, run.rank, run.master, ...
    optimizer = make_optimizer(model, lr, weight_decay, betas, run.device_type)
    net = wrap(model, run, "auto")                     # torch.compile and DDP, as the settings and device ask
"""

import ctypes
import datetime
import math
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import fail, seed_problems
from data import read_meta
from download import DownloadError
from generation import Progress, device_problem, pick_device, target_logprobs
from lora import LORA_CHOICES, check_lora_targets

# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Where and how this process trains: its rank among world processes (DDP under torchrun), its device and
    the autocast dtype (None: full float32)."""
    rank: int
    world: int
    ddp: bool
    device: str
    amp_dtype: torch.dtype = None

    @property
    def master(self):  # rank 0 prints, logs and saves
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()


def start_run(device, dtype):
    """What every training run starts with: malloc settings, the process group (under torchrun), the device and
    autocast dtype."""
    keep_freed_memory()
    rank, world, ddp = setup_distributed()
    dev = pick_device(device)
    run = Run(rank, world, ddp, dev, pick_dtype(dtype, dev.split(":")[0]))
    if run.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return run


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
    world = os.environ.get("WORLD_SIZE", "1")
    if world == "1":
        return 0, 1, False
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    rank = os.environ.get("RANK", "")
    if missing or not world.isdigit() or not rank.isdigit() or not int(rank) < int(world):
        fail(f"WORLD_SIZE={world} is set but {', '.join(missing) or f'RANK={rank} is not a rank below it'}: start "
             f"several processes with torchrun (torchrun --nproc_per_node=2 {Path(sys.argv[0]).name} ...), or "
             f"unset WORLD_SIZE")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = os.environ.get("NANOFT_DDP_TIMEOUT", "300")
    if not timeout.isdigit():
        fail(f"NANOFT_DDP_TIMEOUT={timeout!r} must be a whole number of seconds")
    timeout = float(timeout)
    if rank == "0":
        print(f"waiting for {world} processes at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              f"(at most {timeout:.0f} s, NANOFT_DDP_TIMEOUT)", file=sys.stderr, flush=True)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # the others never came, or the rendezvous failed: torch's own error says which
        fail(f"the {world} processes did not come together at {os.environ['MASTER_ADDR']}:"
             f"{os.environ['MASTER_PORT']} within {timeout:.0f} s ({e.__class__.__name__}: {str(e)[:150]}): start "
             f"them all with torchrun")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), True


def wrap(model, run, compile_setting="auto"):
    """model as the loop calls it: compiled if the setting says so (auto: on CUDA only), and in DDP under
    torchrun. Checkpoints save the unwrapped model, so no _orig_mod. or module. prefix reaches them."""
    setting = str(compile_setting).lower()
    on = run.device_type == "cuda" if setting == "auto" else setting in ("true", "1")
    net = torch.compile(model) if on else model
    if run.ddp:
        net = DDP(net, device_ids=[torch.cuda.current_device()] if run.device_type == "cuda" else None)
    return net


def finish(run):
    if run.ddp:
        dist.barrier()  # nobody tears the group down while another process still uses it
        dist.destroy_process_group()


def dataset_folder(dataset):
    """The name of the folder prepare.py keeps dataset in (and the default out_dir's): out/<it>."""
    from prepare import dataset_name
    try:
        return dataset_name(dataset)
    except ValueError as e:
        fail(f"dataset '{dataset}': {e}")


def prepare_dataset(dataset, run, kinds, what_instead, **kwargs):
    """(folder, meta) of dataset, prepared with prepare.prepare(dataset, **kwargs) on rank 0 (download, tokenize)
    while the other processes wait, then read by all. A dataset of another kind than `kinds` is refused, with
    what_instead saying what the script needs."""
    from prepare import prepare
    try:
        folder = prepare(dataset, **kwargs) if run.master else None
        if run.ddp:
            dist.barrier()
        folder = folder or prepare(dataset, **kwargs)
    except (ValueError, OSError, DownloadError) as e:
        fail(f"dataset '{dataset}': {e}")
    meta = read_meta(folder)
    if meta["kind"] not in kinds:
        fail(f"dataset '{dataset}' is {meta['kind']} data, not {what_instead}")
    return folder, meta


# ----------------------------------------------------------------------------- settings both scripts have

def check_machinery(c):
    """The problems with the settings every training script shares (device, seed, AdamW's betas, dropout, dtype,
    compile, LoRA)."""
    problems = [] if 0 <= c["dropout"] < 1 else [f"dropout={c['dropout']} must be in [0, 1)"]
    problems += [p for p in [device_problem(c["device"])] if p]
    problems += seed_problems(c["seed"])
    problems += [f"{k}={c[k]} must be in [0, 1) (AdamW's moment decay)" for k in ("beta1", "beta2")
                 if not 0 <= c[k] < 1]
    if c["resume"] and c["overwrite"]:
        problems.append("resume=True and overwrite=True contradict each other: choose one")
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


# ----------------------------------------------------------------------------- optimization

def make_optimizer(model, lr, weight_decay, betas, device_type):
    # the fused AdamW is one kernel for all parameters: ~5x faster than the default on CPU too
    fused = device_type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(model.optim_groups(weight_decay), lr=lr, betas=betas, fused=fused)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(it, total, lr, min_lr, warmup):
    """Linear warmup, then cosine decay from lr to min_lr at the last iteration."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def optimizer_step(optimizer, scaler, model, grad_clip):
    """Unscale the gradients (fp16's scaler), clip their norm to grad_clip (0: no clipping), step, clear them."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def stop_unless_finite(loss, it, lr, saved):
    """Stop the run with a message if the loss is NaN or infinite; saved says what checkpoint is left."""
    if not math.isfinite(loss):
        fail(f"the loss became {loss} at iteration {it}: lower lr (now {lr}), use dtype=bfloat16 or float32 "
             f"instead of float16, or lower grad_clip; {saved}", status=1)


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


def plot(records, path, x, curves, ylabel, marker=None):
    """A line chart of records' curves ({key: label}) against x, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.figure(figsize=(6, 4))
    for key, label in curves.items():
        points = [(r[x], r[key]) for r in records if key in r]
        if points:
            plt.plot(*zip(*points), marker=marker, label=label)
    plt.xlabel(x), plt.ylabel(ylabel), plt.legend(), plt.tight_layout()
    plt.savefig(path)
    plt.close()


def summed_loss(model, x, y):
    """(the loss summed over the scored targets of y, their number) for inputs x: generation.target_logprobs,
    which runs the head on the scored positions only, a piece at a time, summed over the rows."""
    gpt = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))  # DDP, compile
    sums, counts = target_logprobs(gpt, x, y)
    return -sum(sums), sum(counts)


@torch.no_grad()
def evaluate_loss(model, batches, run, what="loss"):
    """The mean loss per target token over batches of (inputs, targets), whichever process saw which batch:
    the same number however the split is cut into batches. batches may be a list (shows progress) or any
    iterable."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=run.device, dtype=torch.float64)  # loss summed over tokens, tokens
    progress = None  # counted in tokens: batches in order of length take ever longer, so a count of them misleads
    if run.master and hasattr(batches, "__len__"):
        progress = Progress(what, sum(x.numel() for x, _ in batches), "tokens")
    with run.autocast:  # one context for every batch: it casts each trainable weight to bf16 once, not per batch
        for x, y in batches:
            loss, n = summed_loss(model, x, y)
            total += torch.tensor([loss, n], dtype=torch.float64, device=run.device)
            if progress:
                progress.update(x.numel())
    if run.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] else float("nan")
