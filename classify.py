"""
Fine-tune GPT-2 into a text classifier ("Build a LLM from scratch" ch06: SMS spam), then use it.

    python classify.py                                          # gpt2 on SMS spam, the ch06 recipe
    python classify.py --dataset=reviews.csv --trainable=all    # any .csv/.tsv with label and text columns
    python classify.py --model=out/spam/ckpt.pt --text="WINNER!! Claim your prize"
    python classify.py --model=out/spam/ckpt.pt --text=FILE:messages.txt   # one message a line
    torchrun --nproc_per_node=2 classify.py                     # DDP, as finetune.py

The classifier is GPT-2's transformer with a new Linear(n_embd, classes) head reading the hidden state of
one position; the 50,257-way lm_head is never computed. By default that position is each example's last
real token: padding is on the right, so causal attention keeps it from seeing any padding.
"""

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure, fail
from finetune import (EOT, Split, StopOnSigint, check_machinery, device_and_autocast, length_grouped_batches,
                      lora_settings, lr_at, make_optimizer, optimizer_step, prepare_once, resolve_compile, rng_state,
                      save_atomic, set_rng_state, start_log, start_run, trainable_line)
from load_gpt2 import DownloadError, build, check_state, load_gpt2, restore_lora
from model import GPT, PRESETS, GPTConfig, add_lora
from prepare import read_meta

# -----------------------------------------------------------------------------
model = "gpt2"  # training: a GPT-2 name, HF folder or .safetensors; predicting: a classifier's ckpt.pt
dataset = "spam"  # a prepare.py classification dataset, or a path/URL to a .csv/.tsv with label and text columns
data_dir = "data"
out_dir = ""  # default: out/<dataset>
text = ""  # predict mode: a message, or FILE:path for one message a line (needs --model=.../ckpt.pt)
epochs = 5
batch_size = 8  # examples per step (per process); a batch is padded to its longest example only
lr = 5e-5
decay_lr = False  # True: cosine decay from lr to min_lr (the book keeps lr constant)
min_lr = 5e-6
warmup_iters = 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.999  # torch's AdamW default, as in the book
grad_clip = 0.0  # 0 = off (the book does not clip)
dropout = 0.0
trainable = "last"  # head, last (last block + ln_f + head), all, or N (last N blocks + ln_f + head); not with LoRA
lora_rank = 0  # > 0: train LoRA adapters of this rank (and the new head, unless it has an adapter) instead
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj,head"  # also attn.c_attn (q/k/v as one); head = the new head
pooling = "last_real"  # last_real: each example's last real token; last: position T-1 of the batch (the book)
train_subset = 0  # if > 0, train on the first N train examples only
max_length = 1024  # longer examples are dropped by prepare; inputs are cut to the model's context
eval_interval = 1  # epochs between evaluations (and checkpoints)
log_interval = 20  # iterations between progress lines
seed = 1337  # data splits (prepare.py's default), batch order and the head's initial weights
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto, bfloat16, float16 or float32 (float32 turns autocast off)
compile = "auto"  # auto: on for CUDA only; True / False
resume = False  # continue from out_dir/ckpt.pt
# -----------------------------------------------------------------------------


class Classifier(nn.Module):
    """A GPT (GPT-2's names stay, so checkpoints read as gpt.h.11... and head.*) and a class head."""

    def __init__(self, gpt, num_classes, pooling="last_real"):
        super().__init__()
        gpt.tie_weights()  # lm_head is never used here: an untied one (a merged LoRA head) would be trained for nothing
        self.gpt, self.pooling = gpt, pooling
        self.head = nn.Linear(gpt.config.n_embd, num_classes)

    def forward(self, idx, lengths, labels=None):
        """idx (B, T) right-padded ids, lengths (B,) real tokens per row -> (logits (B, classes), loss)."""
        logits = self.head(pool(self.gpt.hidden_states(idx), lengths, self.pooling))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss

    optim_groups = GPT.optim_groups  # decay on matrices, frozen parameters left out: it only uses .parameters()


def pool(hidden, lengths, pooling):
    """The (B, C) hidden states the head reads: at each row's last real token, or at the last position."""
    last = lengths - 1 if pooling == "last_real" else torch.full_like(lengths, hidden.size(1) - 1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def freeze(clf, trainable):
    """Train only what `trainable` names; returns clf."""
    n_layer = clf.gpt.config.n_layer
    blocks = int(trainable) if trainable.isdigit() else {"head": 0, "last": 1, "all": n_layer}[trainable]
    clf.requires_grad_(trainable == "all")  # the embeddings train only with `all`
    clf.head.requires_grad_(True)
    if trainable != "head":
        clf.gpt.ln_f.requires_grad_(True)
        clf.gpt.h[n_layer - blocks:].requires_grad_(True)
    return clf


def collate_labelled(examples, max_len, pad_id=EOT, device="cpu"):
    """(idx, lengths, labels) for (token ids, label) examples: right-padded with <|endoftext|> to the
    longest example of the batch, each cut to its first max_len tokens (the model's context)."""
    lengths = torch.tensor([min(len(ids), max_len) for ids, _ in examples])
    idx = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        idx[row, :lengths[row]] = torch.as_tensor(np.asarray(ids[:max_len], dtype=np.int64))
    labels = torch.tensor([label for _, label in examples])
    return idx.to(device), lengths.to(device), labels.to(device)


class LabelledSplit(Split):
    """A prepared classification split: finetune.Split's memory-mapped arrays, with labels."""

    def example(self, i):
        return self.arrays["tokens"][self.offsets[i]:self.offsets[i + 1]], int(self.arrays["labels"][i])

    def batch(self, indices, max_len, device):
        return collate_labelled([self.example(i) for i in indices], max_len, device=device)


# ----------------------------------------------------------------------------- evaluation and metrics

@torch.no_grad()
def evaluate(net, split, num_classes, batch_size, max_len, device, ctx, rank=0, world=1):
    """(mean loss, confusion matrix: rows = true label, columns = predicted) over the whole split. Batches
    are cut from the examples sorted by length (little padding); each process takes every world-th one."""
    net.eval()
    order = np.argsort(split.lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    loss_sum, confusion = torch.zeros((), device=device), torch.zeros(num_classes, num_classes, device=device)
    for indices in batches[rank::world]:
        idx, lengths, labels = split.batch(indices, max_len, device)
        with ctx:
            logits, loss = net(idx, lengths, labels)
        loss_sum += loss.float() * len(labels)
        confusion.index_put_((labels, logits.argmax(-1)), torch.ones_like(labels, dtype=torch.float),
                             accumulate=True)
    if world > 1:
        dist.all_reduce(loss_sum), dist.all_reduce(confusion)
    net.train()
    return loss_sum.item() / max(1, len(split)), confusion.long().cpu()


def accuracy(confusion):
    return confusion.trace().item() / max(1, confusion.sum().item())


def per_class(confusion, labels):
    """Precision, recall, F1 and support of each class (0 where a ratio has nothing to divide)."""
    report = {}
    for i, label in enumerate(labels):
        hits, predicted, support = confusion[i, i].item(), confusion[:, i].sum().item(), confusion[i].sum().item()
        p, r = hits / predicted if predicted else 0.0, hits / support if support else 0.0
        report[label] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support}
    return report


def print_report(split, confusion, labels):
    width = max(6, *map(len, labels))
    print(f"{split} confusion (rows = true label, columns = predicted):")
    print(" " * (width + 2) + "".join(f"{label:>{width + 2}}" for label in labels))
    for label, row in zip(labels, confusion.tolist()):
        print(f"  {label:>{width}}" + "".join(f"{n:>{width + 2}}" for n in row))
    print(f"  {'':>{width}}  precision  recall     f1  support")
    for label, m in per_class(confusion, labels).items():
        print(f"  {label:>{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:.4f}  {m['support']:7d}")


def epoch_line(r, epochs, eta):
    val = f" | val loss {r['val_loss']:.4f} acc {r['val_acc']:.2%}" if "val_loss" in r else ""
    return (f"epoch {r['epoch']}/{epochs} | train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}{val} | "
            f"{r['examples_per_s']:.1f} examples/s | {r['seconds']:.1f}s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s")


def plot_accuracy(log, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.figure(figsize=(6, 4))
    for key, label in (("train_acc", "train (during the epoch)"), ("val_acc", "val")):
        points = [(r["epoch"], r[key]) for r in log if key in r]
        if points:
            plt.plot(*zip(*points), marker="o", label=label)
    plt.xlabel("epoch"), plt.ylabel("accuracy"), plt.legend(), plt.tight_layout()
    plt.savefig(path)
    plt.close()


# ----------------------------------------------------------------------------- checkpoints

def read_checkpoint(path):
    """A classifier checkpoint as a dict, or a one-line error saying what the file is instead."""
    what = "a GPT-2 language model, not a classifier"
    if str(path) in PRESETS or Path(path).is_dir() or Path(path).suffix == ".safetensors":
        fail(f"model '{path}' is {what}: train one with `python classify.py` and pass --model=out/<dataset>/ckpt.pt")
    if not Path(path).is_file():
        fail(f"model '{path}' does not exist (a classifier is a ckpt.pt written by classify.py: out/<dataset>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read on use
    except Exception as e:
        fail(f"{path} is not a checkpoint this project can read ({e.__class__.__name__})")
    if isinstance(ckpt, dict) and ckpt.get("kind") == "classifier":
        return ckpt
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        fail(f"{path} is {what} (an instruction fine-tune from finetune.py?): use a ckpt.pt written by classify.py")
    fail(f"{path} is not a classifier checkpoint (it has no kind='classifier'): use one written by classify.py")


def load_classifier(ckpt, device="cpu", dropout=0.0, merge_lora=True, path="the checkpoint"):
    """The Classifier of a checkpoint dict (read from path), its GPT part checked and built by load_gpt2; LoRA
    adapters merged into the weights, or kept (merge_lora=False, to resume). A ValueError says what does not fit."""
    config = GPTConfig(**ckpt["model_config"])
    weights = {k: v for k, v in ckpt["model"].items() if ".lora_" not in k}
    state = {k.removeprefix("gpt."): v for k, v in weights.items() if k.startswith("gpt.")}
    state.pop("lm_head.weight", None)  # tied to wte
    clf = Classifier(build(config, check_state(state, config), device, dropout=dropout), len(ckpt["labels"]),
                     ckpt["pooling"]).to(device)
    clf.head.load_state_dict({k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")})
    adapters = {k: v for k, v in ckpt["model"].items() if ".lora_" in k}
    clf = restore_lora(clf, ckpt.get("lora"), adapters, merge_lora, path)
    return clf if merge_lora else head_trains_unless_adapted(clf, ckpt.get("lora"))


def head_trains_unless_adapted(clf, lora):
    """With LoRA, the new head (random weights) trains in full, unless LoRA targets it too (as the book does)."""
    if lora and "head" not in lora["targets"]:
        clf.head.requires_grad_(True)
    return clf


# ----------------------------------------------------------------------------- predict mode

def predict():
    ckpt = read_checkpoint(model)
    if text.startswith("FILE:"):
        path = Path(text.removeprefix("FILE:"))
        if not path.is_file():
            fail(f"text file {path} does not exist")
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): an SMS may hold \x0c or \u2028
        messages = [line.removesuffix("\r") for line in lines if line.strip()]
    else:
        messages = [text]
    dev, _, _, ctx = device_and_autocast(device, dtype)
    try:
        clf = load_classifier(ckpt, dev, path=model).eval()
    except ValueError as e:
        fail(str(e))
    enc, labels = tiktoken.get_encoding("gpt2"), ckpt["labels"]
    for i in range(0, len(messages), batch_size):
        group = messages[i:i + batch_size]
        batch = [(enc.encode_ordinary(m), 0) for m in group]
        idx, lengths, _ = collate_labelled(batch, clf.gpt.config.block_size, device=dev)
        with torch.no_grad(), ctx:
            probs = clf(idx, lengths)[0].float().softmax(-1)
        for message, p in zip(group, probs):
            print(f"{labels[p.argmax().item()]}\t{p.max().item():.4f}\t{message}")


# ----------------------------------------------------------------------------- training

def check_settings(c):
    """Catch impossible values before anything is loaded; returns the list of problems."""
    problems = [f"{k}={c[k]} must be at least 1" for k in ("epochs", "batch_size", "eval_interval", "log_interval")
                if c[k] < 1]
    problems += [f"{k}={c[k]} must not be negative" for k in ("lr", "min_lr", "warmup_iters", "weight_decay",
                                                             "grad_clip", "train_subset") if c[k] < 0]
    if c["trainable"] not in ("head", "last", "all") and not c["trainable"].isdigit():
        problems.append(f"trainable='{c['trainable']}' must be head, last, all or a number of last blocks")
    if c["lora_rank"] > 0 and c["trainable"] != "last":
        problems.append(f"trainable='{c['trainable']}' does not go with LoRA (lora_rank={c['lora_rank']}): the "
                        f"adapters are what trains; leave trainable out")
    if c["pooling"] not in ("last_real", "last"):
        problems.append(f"pooling='{c['pooling']}' must be last_real or last")
    return problems + check_machinery(c)


def prepare_data(ddp, master):
    """The dataset's folder and meta.json: rank 0 prepares it while the others wait, then all read it."""
    try:
        folder = prepare_once(dataset, ddp, master, data_dir=data_dir, seed=seed, max_length=max_length)
    except (ValueError, OSError, DownloadError) as e:
        fail(f"dataset '{dataset}': {e}")
    meta = read_meta(folder)
    if meta["kind"] != "classification":
        fail(f"dataset '{dataset}' is {meta['kind']} data, not labelled examples: classify.py needs spam or a "
             f".csv/.tsv with label and text columns (finetune.py trains on instruction data)")
    if len(meta["labels"]) < 2:
        fail(f"dataset '{dataset}' has a single label, {meta['labels']}: a classifier needs two or more")
    return folder, meta


def build_model(labels, out, dev, lora):
    """(classifier, checkpoint or None): GPT-2 + a fresh head, or everything from out/ckpt.pt to resume;
    with LoRA, its adapters on and everything else frozen."""
    if not resume:
        try:
            gpt = load_gpt2(model, device=dev, dropout=dropout)
        except Exception as e:  # downloads, hostile or mismatched files: all explained in the message
            fail(f"could not load model '{model}': {e}")
        torch.manual_seed(seed)  # the head's initial weights (and the adapters')
        clf = Classifier(gpt, len(labels), pooling).to(dev)
        return (head_trains_unless_adapted(add_lora(clf, **lora), lora) if lora else clf), None
    ckpt_path = out / "ckpt.pt"
    if not ckpt_path.exists():
        fail(f"resume=True but there is no checkpoint at {ckpt_path}; run without resume to start a new run")
    ckpt = read_checkpoint(ckpt_path)
    saved = ckpt["config"]
    if (ckpt["labels"] != labels or (saved["trainable"], saved["pooling"]) != (trainable, pooling)
            or ckpt.get("lora") != lora):
        fail(f"{ckpt_path} was trained with labels {ckpt['labels']}, trainable={saved['trainable']}, pooling="
             f"{saved['pooling']}, LoRA {ckpt.get('lora')}: resume with the same settings, or use another out_dir")
    try:
        return load_classifier(ckpt, dev, dropout, merge_lora=False, path=ckpt_path), ckpt
    except ValueError as e:
        fail(str(e))


def main(config):
    problems = check_settings(config)
    if problems:
        fail("; ".join(problems))
    if text:
        return predict()
    rank, world, ddp, dev, device_type, amp_dtype, ctx = start_run(device, dtype)
    master = rank == 0

    folder, meta = prepare_data(ddp, master)
    labels = meta["labels"]
    train, val, test = (LabelledSplit(folder, s) for s in ("train", "val", "test"))
    if train_subset:
        train.lengths = train.lengths[:train_subset]  # len(train) follows lengths
    out = Path(out_dir or Path("out") / folder.name)

    lora = lora_settings(config)
    clf, ckpt = build_model(labels, out, dev, lora)
    if not lora:  # frozen before the optimizer is made: it takes the trainable parameters only
        if trainable.isdigit() and int(trainable) > clf.gpt.config.n_layer:
            fail(f"trainable={trainable} but the model has {clf.gpt.config.n_layer} blocks")
        freeze(clf, trainable)
    clf.train()
    max_len = clf.gpt.config.block_size
    optimizer = make_optimizer(clf, lr, weight_decay, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
    start_iter, stats = 0, torch.zeros(3, device=dev)  # this epoch so far: loss sum, correct, examples
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_iter = ckpt["iter_num"]
        set_rng_state(ckpt["rng"])
        if master:  # the other processes' share of an interrupted epoch is not saved: their counts restart
            stats = ckpt["epoch_stats"].to(dev).clone()
    net = torch.compile(clf) if resolve_compile(compile, device_type) else clf
    if ddp:
        net = DDP(net, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)

    steps_per_epoch = len(length_grouped_batches(train.lengths, batch_size, seed, 0)) // world
    if steps_per_epoch == 0:
        fail(f"the train split has {len(train)} examples: too few for batch_size={batch_size} x {world} process(es)")
    total_iters = epochs * steps_per_epoch
    log = []
    if master:
        log = start_log(out, resume, start_iter)
        print(f"{trainable_line(clf, lora, f'trainable={trainable}')} on {dev}, autocast {amp_dtype}, "
              f"{world} process(es); {len(train)} train / "
              f"{len(val)} val / {len(test)} test examples, labels {labels}; {epochs} epochs of {steps_per_epoch} "
              f"iterations; pooling={pooling}")

    def write_log(record):
        log.append(record)
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    def save(it):
        save_atomic({"model": clf.state_dict(), "model_config": asdict(clf.gpt.config), "kind": "classifier",
                     "labels": labels, "pooling": pooling, "config": config, "meta": meta,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": it,
                     "epoch": it / steps_per_epoch, "epoch_stats": stats.cpu(), "rng": rng_state(), "lora": lora},
                    out / "ckpt.pt")

    stop = StopOnSigint()
    it, batches, t_epoch, seen = start_iter, {}, time.time(), 0  # seen: examples trained since t_epoch
    while it < total_iters:
        epoch, step = divmod(it, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: length_grouped_batches(train.lengths, batch_size, seed, epoch)}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, total_iters, lr, min_lr if decay_lr else lr, warmup_iters)
        idx, lengths, y = train.batch(batches[epoch][step * world + rank], max_len, dev)
        with ctx:
            logits, loss = net(idx, lengths, y)
        if not math.isfinite(loss.item()):
            fail(f"the loss became {loss.item()} at iteration {it}: lower lr (now {lr}), or use dtype=bfloat16 or "
                 f"float32 instead of float16; {out / 'ckpt.pt'} holds the last epoch's state, if any", status=1)
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, clf, grad_clip)
        # train loss and accuracy of the epoch come from its batches as they are trained: free, no extra pass
        stats += torch.tensor([loss.item() * len(y), (logits.argmax(-1) == y).sum().item(), len(y)], device=dev)
        it, seen = it + 1, seen + len(y) * world

        if master and (it % log_interval == 0 or it == start_iter + 1) and it % steps_per_epoch:  # first at once
            print(f"iter {it}/{total_iters} | epoch {it / steps_per_epoch:.2f} | loss {loss.item():.4f} | "
                  f"{seen / (time.time() - t_epoch):.1f} examples/s", flush=True)
        if it % steps_per_epoch == 0:  # the end of an epoch
            if ddp:
                dist.all_reduce(stats)
            seconds = time.time() - t_epoch
            record = {"iter": it, "epoch": it // steps_per_epoch, "train_loss": (stats[0] / stats[2]).item(),
                      "train_acc": (stats[1] / stats[2]).item(), "seconds": seconds, "examples_per_s": seen / seconds}
            stats.zero_()
            if record["epoch"] % eval_interval == 0 or it == total_iters:
                val_loss, confusion = evaluate(net, val, len(labels), batch_size, max_len, dev, ctx, rank, world)
                record.update(val_loss=val_loss, val_acc=accuracy(confusion))
            if master:
                print(epoch_line(record, epochs, seconds * (total_iters - it) / steps_per_epoch), flush=True)
                write_log(record)
                save(it)
            t_epoch, seen = time.time(), 0  # evaluation time is not training time
        if stop.requested:
            if master:
                save(it)
                print(f"saved {out / 'ckpt.pt'} at iteration {it}; continue with --resume=True")
            sys.exit(130)

    results = {s: evaluate(net, split, len(labels), batch_size, max_len, dev, ctx, rank, world)
               for s, split in (("train", train), ("val", val), ("test", test))}
    if master:
        metrics = {"accuracy": {s: accuracy(c) for s, (_, c) in results.items()},
                   "loss": {s: loss for s, (loss, _) in results.items()},
                   "confusion": {s: c.tolist() for s, (_, c) in results.items()},
                   "per_class": per_class(results["test"][1], labels), "labels": labels}
        print("accuracy: " + ", ".join(f"{s} {a:.2%}" for s, a in metrics["accuracy"].items()))
        print_report("test", results["test"][1], labels)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_accuracy(log, out / "accuracy.png")
        print(f"wrote {out / 'metrics.json'} and {out / 'ckpt.pt'}")
    if ddp:
        dist.barrier()  # nobody tears the group down while another process still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(configure(globals()))
