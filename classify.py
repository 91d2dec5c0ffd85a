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
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from checkpoints import (RunLog, SaveError, check_out_dir, claim_out_dir, read_resume_checkpoint,
                         restore_training_state, resumed_config, save_atomic, training_state)
from configurator import checked, configure, fail, given_keys
from data import EOT, Split, length_grouped_batches, tokenizer
from generation import Progress, clock, pick_device
from load_gpt2 import build, check_state, config_from_dict, load_gpt2, read_checkpoint, restore_lora
from lora import add_lora
from model import GPT, PRESETS
from training import (Run, StopOnSigint, check_machinery, dataset_folder, finish, lora_settings, lr_at, make_optimizer,
                      optimizer_step, pick_dtype, plot, prepare_dataset, set_lr, start_run, stop_unless_finite,
                      trainable_line, wrap)
from weights import atomic_write

# -----------------------------------------------------------------------------
model = "gpt2"  # training: a GPT-2 name, HF folder or .safetensors; predicting: a classifier's ckpt.pt
dataset = "spam"  # a prepare.py classification dataset, or a path/URL to a .csv/.tsv with label and text columns
data_dir = "data"  # where prepare.py keeps datasets: data_dir/NAME
out_dir = ""  # where the checkpoint, metrics and log go; default: out/<dataset>
text = ""  # predict mode: a message, or FILE:path for one message a line (needs --model=.../ckpt.pt)
epochs = 5  # passes over the train split
batch_size = 8  # examples per step (per process); a batch is padded to its longest example only
lr = 5e-5  # AdamW's learning rate (the book's)
decay_lr = False  # True: cosine decay from lr to min_lr (the book keeps lr constant)
min_lr = 5e-6  # where decay_lr ends
warmup_iters = 0  # iterations of linear warmup from 0 to lr
weight_decay = 0.1  # AdamW's, on weight matrices only
beta1 = 0.9  # AdamW's first-moment decay
beta2 = 0.999  # AdamW's second-moment decay: torch's default, as in the book
grad_clip = 0.0  # clip the gradient norm to this; 0 = off (the book does not clip)
dropout = 0.0  # dropout in every block while training
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
compile_ = "auto"  # torch.compile the model: auto (on for CUDA only), True or False
resume = False  # continue out_dir/ckpt.pt: its settings are used, except those given that may change (README)
overwrite = False  # start over in an out_dir that holds an earlier run's results (they are deleted)
# -----------------------------------------------------------------------------

POOLINGS = ("last_real", "last")
MAY_CHANGE = {"resume", "out_dir", "data_dir", "epochs", "eval_interval", "log_interval", "device", "dtype",
              "compile"}  # what a resumed run may change: where, how long, how often, on what


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
    """A prepared classification split: data.Split's memory-mapped arrays, with labels."""

    def example(self, i):
        return self.arrays["tokens"][self.offsets[i]:self.offsets[i + 1]], int(self.arrays["labels"][i])

    def batch(self, indices, max_len, device):
        return collate_labelled([self.example(i) for i in indices], max_len, device=device)


# ----------------------------------------------------------------------------- evaluation and metrics

@torch.no_grad()
def evaluate(net, split, num_classes, batch_size, max_len, run, what="evaluation"):
    """(mean loss, confusion matrix: rows = true label, columns = predicted) over the whole split. Batches
    are cut from the examples sorted by length (little padding); each process takes every world-th one."""
    net.eval()
    order = np.argsort(split.lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][run.rank::run.world]
    loss_sum = torch.zeros((), device=run.device)
    confusion = torch.zeros(num_classes, num_classes, device=run.device)
    progress = Progress(what, sum(split.tokens(b, max_len) for b in batches), "tokens") if run.master else None
    for indices in batches:
        idx, lengths, labels = split.batch(indices, max_len, run.device)
        with run.autocast:
            logits, loss = net(idx, lengths, labels)
        loss_sum += loss.float() * len(labels)
        confusion.index_put_((labels, logits.argmax(-1)), torch.ones_like(labels, dtype=torch.float),
                             accumulate=True)
        if progress:
            progress.update(split.tokens(indices, max_len))
    if run.world > 1:
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


def epoch_line(r, epochs, seconds_left):
    val = f" | val loss {r['val_loss']:.4f} acc {r['val_acc']:.2%}" if "val_loss" in r else ""
    return (f"epoch {r['epoch']}/{epochs} | train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}{val} | "
            f"{r['examples_per_s']:.1f} examples/s | {r['seconds']:.1f}s | ETA {clock(seconds_left)}")


# ----------------------------------------------------------------------------- checkpoints

def read_classifier(path):
    """A classifier checkpoint as a dict, or a one-line error saying what the file is instead."""
    what = "a GPT-2 language model, not a classifier"
    if str(path) in PRESETS or Path(path).is_dir() or Path(path).suffix == ".safetensors":
        fail(f"model '{path}' is {what}: train one with `python classify.py` and pass --model=out/<dataset>/ckpt.pt")
    if not Path(path).is_file():
        fail(f"model '{path}' does not exist (a classifier is a ckpt.pt written by classify.py: out/<dataset>/ckpt.pt)")
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        fail(str(e))
    if ckpt.get("kind") != "classifier":
        fail(f"{path} is {what} (an instruction fine-tune from finetune.py?): use a ckpt.pt written by classify.py")
    return ckpt


def load_classifier(ckpt, device="cpu", dropout=0.0, merge_lora=True, path="the checkpoint"):
    """The Classifier of a checkpoint dict (read from path), its GPT part checked and built by load_gpt2; LoRA
    adapters merged into the weights, or kept (merge_lora=False, to resume). A ValueError says what does not fit."""
    config = config_from_dict(ckpt["model_config"])
    if not (isinstance(ckpt.get("labels"), list) and len(ckpt["labels"]) >= 2 and ckpt.get("pooling") in POOLINGS):
        raise ValueError(f"{path} has no list of labels or no pooling setting: it is not a whole classifier checkpoint")
    weights = {k: v for k, v in ckpt["model"].items() if ".lora_" not in k}
    state = {k.removeprefix("gpt."): v for k, v in weights.items() if k.startswith("gpt.")}
    state.pop("lm_head.weight", None)  # tied to wte
    clf = Classifier(build(config, check_state(state, config), device, dropout=dropout), len(ckpt["labels"]),
                     ckpt["pooling"]).to(device)
    head = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in head.items()}
    if shapes != {k: tuple(v.shape) for k, v in clf.head.state_dict().items()}:
        raise ValueError(f"{path}: its head ({shapes or 'none'}) does not fit {len(ckpt['labels'])} labels and "
                         f"n_embd={config.n_embd}")
    clf.head.load_state_dict(head)
    adapters = {k: v for k, v in ckpt["model"].items() if ".lora_" in k}
    clf = restore_lora(clf, ckpt.get("lora"), adapters, merge_lora, path, head="head")
    return clf if merge_lora else head_trains_unless_adapted(clf, ckpt.get("lora"))


def head_trains_unless_adapted(clf, lora):
    """With LoRA, the new head (random weights) trains in full, unless LoRA targets it too (as the book does)."""
    if lora and "head" not in lora["targets"]:
        clf.head.requires_grad_(True)
    return clf


# ----------------------------------------------------------------------------- predict mode

def read_messages(text):
    """The messages to classify: text itself, or with FILE:path, each non-empty line of that file."""
    if not text.startswith("FILE:"):
        return [text]
    if text == "FILE:":
        fail("--text=FILE: names no file: give its path after FILE:")
    path = Path(text.removeprefix("FILE:"))
    if not path.is_file():
        fail(f"text file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): an SMS may hold \x0c or \u2028
    except UnicodeDecodeError as e:
        fail(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8")
    messages = [line.removesuffix("\r") for line in lines if line.strip()]
    if not messages:
        fail(f"text file {path} has no non-empty line: one message a line")
    return messages


def predict(c):
    """Print label, probability and message for each message of c.text."""
    ckpt = read_classifier(c.model)
    messages = read_messages(c.text)
    dev = pick_device(c.device)
    run = Run(0, 1, False, dev, pick_dtype(c.dtype, dev.split(":")[0]))  # one process, no training: its autocast
    try:
        clf = load_classifier(ckpt, dev, path=c.model).eval()
        enc, labels = tokenizer(), ckpt["labels"]
    except (ValueError, OSError) as e:
        fail(str(e))
    for i in range(0, len(messages), c.batch_size):
        group = messages[i:i + c.batch_size]
        idx, lengths, _ = collate_labelled([(enc.encode_ordinary(m), 0) for m in group], clf.gpt.config.block_size,
                                           device=dev)
        with torch.no_grad(), run.autocast:
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
    if c["lora_rank"] > 0 and c["trainable"] != "last":
        problems.append(f"trainable='{c['trainable']}' does not go with LoRA (lora_rank={c['lora_rank']}): the "
                        f"adapters are what trains; leave trainable out")
    if not (c["trainable"] in ("head", "last", "all") or (c["trainable"].isascii() and c["trainable"].isdigit())):
        problems.append(f"trainable='{c['trainable']}' must be head, last, all or a number of last blocks")
    if c["pooling"] not in POOLINGS:
        problems.append(f"pooling='{c['pooling']}' must be last_real or last")
    return problems + check_machinery(c)


def build_model(c, run, labels, lora, ckpt, path):
    """GPT-2 + a fresh head, or everything from a checkpoint to resume (ckpt, read from path); with LoRA, its
    adapters on and everything else frozen, else frozen as `trainable` says."""
    if ckpt:
        if ckpt["labels"] != labels:
            fail(f"{path} was trained with labels {ckpt['labels']}, but the dataset now has {labels}: the data "
                 f"changed, so the run cannot go on; start a new run in another --out_dir")
        try:
            clf = load_classifier(ckpt, run.device, c.dropout, merge_lora=False, path=path)
        except ValueError as e:
            fail(str(e))
    else:
        try:
            gpt = load_gpt2(c.model, device=run.device, dropout=c.dropout)
        except Exception as e:  # downloads, hostile or mismatched files: all explained in the message
            fail(f"could not load model '{c.model}': {e}")
        torch.manual_seed(c.seed)  # the head's initial weights (and the adapters')
        clf = Classifier(gpt, len(labels), c.pooling).to(run.device)
        if lora:
            head_trains_unless_adapted(add_lora(clf, **lora, head="head"), lora)
    if not lora:  # frozen before the optimizer is made: it takes the trainable parameters only
        if c.trainable.isdigit() and int(c.trainable) > clf.gpt.config.n_layer:
            fail(f"trainable={c.trainable} but the model has {clf.gpt.config.n_layer} blocks")
        freeze(clf, c.trainable)
    return clf.train()


def main(config):
    c = checked(config, check_settings(config))
    if c.text.strip():
        return predict(c)
    if "text" in given_keys():  # --text="" (an unset shell variable?) must not start training instead
        fail("--text is empty: give a message, or FILE:path for one message a line; leave --text out to train")
    out = Path(c.out_dir or Path("out") / dataset_folder(c.dataset)).expanduser()
    ckpt = None
    if int(os.environ.get("RANK", 0)) == 0:  # an earlier run's results: refused before any work
        check_out_dir(out, c.resume, c.overwrite)
    if c.resume:  # the run's own settings, but for those given that may change
        ckpt = read_resume_checkpoint(out, {"kind": str, "labels": list, "pooling": str, "epoch_stats": torch.Tensor})
        if ckpt["kind"] != "classifier":
            fail(f"{out / 'ckpt.pt'} is not a classifier written by classify.py: it cannot be resumed here")
        config = resumed_config(config, ckpt, given_keys(), MAY_CHANGE, out / "ckpt.pt")
        c = checked(config, check_settings(config))
    run = start_run(c.device, c.dtype)

    # data
    folder, meta = prepare_dataset(c.dataset, run, ("classification",), "labelled examples: classify.py needs spam "
                                   "or a .csv/.tsv with label and text columns (finetune.py trains on instruction "
                                   "data)", data_dir=c.data_dir, seed=c.seed, max_length=c.max_length)
    labels = meta["labels"]
    if len(labels) < 2:
        fail(f"dataset '{c.dataset}' has a single label, {labels}: a classifier needs two or more")
    train, val, test = (LabelledSplit(folder, s) for s in ("train", "val", "test"))
    if c.train_subset:
        train.lengths = train.lengths[:c.train_subset]  # len(train) follows lengths

    # model
    lora = lora_settings(config)
    clf = build_model(c, run, labels, lora, ckpt, out / "ckpt.pt")
    if run.master:  # the model is loaded: only now may an earlier run's results be replaced
        claim_out_dir(out, c.resume, c.overwrite)
    max_len = clf.gpt.config.block_size
    optimizer = make_optimizer(clf, c.lr, c.weight_decay, (c.beta1, c.beta2), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.amp_dtype == torch.float16)
    start_iter = restore_training_state(ckpt, optimizer, scaler, out / "ckpt.pt") if ckpt else 0
    stats = torch.zeros(3, device=run.device)  # this epoch so far: loss sum, correct, examples
    if ckpt and run.master:  # the other processes' share of an interrupted epoch is not saved: their counts restart
        stats = ckpt["epoch_stats"].to(run.device).clone()
    net = wrap(clf, run, c.compile)

    steps_per_epoch = len(length_grouped_batches(train.lengths, c.batch_size, c.seed, 0)) // run.world
    if steps_per_epoch == 0:
        fail(f"the train split has {len(train)} examples: too few for batch_size={c.batch_size} x {run.world} "
             f"process(es)")
    total_iters = c.epochs * steps_per_epoch
    log = None
    if run.master:
        log = RunLog(out, start_iter, c.resume)
        print(f"{trainable_line(clf, lora, f'trainable={c.trainable}')} on {run.device}, autocast {run.amp_dtype}, "
              f"{run.world} process(es); {len(train)} train / {len(val)} val / {len(test)} test examples, labels "
              f"{labels}; {c.epochs} epochs of {steps_per_epoch} iterations; pooling={c.pooling}")

    def save(it):
        try:
            save_atomic({"model": clf.state_dict(), "model_config": asdict(clf.gpt.config), "kind": "classifier",
                         "labels": labels, "pooling": c.pooling, "config": config, "meta": meta,
                         **training_state(optimizer, scaler, it), "epoch": it / steps_per_epoch,
                         "epoch_stats": stats.cpu(), "lora": lora}, out / "ckpt.pt")
        except SaveError as e:
            fail(str(e), status=1)

    # the loop
    stop = StopOnSigint()
    it, batches, t_epoch, seen = start_iter, {}, time.time(), 0  # seen: examples trained since t_epoch
    while it < total_iters:
        epoch, step = divmod(it, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: length_grouped_batches(train.lengths, c.batch_size, c.seed, epoch)}
        set_lr(optimizer, lr_at(it, total_iters, c.lr, c.min_lr if c.decay_lr else c.lr, c.warmup_iters))
        idx, lengths, y = train.batch(batches[epoch][step * run.world + run.rank], max_len, run.device)
        with run.autocast:
            logits, loss = net(idx, lengths, y)
        stop_unless_finite(loss.item(), it, c.lr, f"{out / 'ckpt.pt'} holds the last epoch's state, if any")
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler, clf, c.grad_clip)
        # train loss and accuracy of the epoch come from its batches as they are trained: free, no extra pass
        stats += torch.tensor([loss.item() * len(y), (logits.argmax(-1) == y).sum().item(), len(y)], device=run.device)
        it, seen = it + 1, seen + len(y) * run.world

        if run.master and (it % c.log_interval == 0 or it == start_iter + 1) and it % steps_per_epoch:  # first at once
            print(f"iter {it}/{total_iters} | epoch {it / steps_per_epoch:.2f} | loss {loss.item():.4f} | "
                  f"{seen / (time.time() - t_epoch):.1f} examples/s", flush=True)
        if it % steps_per_epoch == 0:  # the end of an epoch
            if run.ddp:
                dist.all_reduce(stats)
            seconds = time.time() - t_epoch
            record = {"iter": it, "epoch": it // steps_per_epoch, "train_loss": (stats[0] / stats[2]).item(),
                      "train_acc": (stats[1] / stats[2]).item(), "seconds": seconds, "examples_per_s": seen / seconds}
            stats.zero_()
            if record["epoch"] % c.eval_interval == 0 or it == total_iters:
                val_loss, confusion = evaluate(net, val, len(labels), c.batch_size, max_len, run, "val")
                record.update(val_loss=val_loss, val_acc=accuracy(confusion))
            if run.master:
                print(epoch_line(record, c.epochs, seconds * (total_iters - it) / steps_per_epoch), flush=True)
                log.write(record)
                save(it)
            t_epoch, seen = time.time(), 0  # evaluation time is not training time
        if stop.requested:
            if run.master:
                save(it)
                print(f"saved {out / 'ckpt.pt'} at iteration {it}; continue with --resume=True")
            sys.exit(130)

    # the end: every split evaluated with the trained model
    results = {s: evaluate(net, split, len(labels), c.batch_size, max_len, run, s)
               for s, split in (("train", train), ("val", val), ("test", test))}
    if run.master:
        metrics = {"accuracy": {s: accuracy(m) for s, (_, m) in results.items()},
                   "loss": {s: loss for s, (loss, _) in results.items()},
                   "confusion": {s: m.tolist() for s, (_, m) in results.items()},
                   "per_class": per_class(results["test"][1], labels), "labels": labels}
        print("accuracy: " + ", ".join(f"{s} {a:.2%}" for s, a in metrics["accuracy"].items()))
        print_report("test", results["test"][1], labels)
        atomic_write(out / "metrics.json", [(json.dumps(metrics, indent=1) + "\n").encode()])
        plot(log.records, out / "accuracy.png", "epoch", {"train_acc": "train (during the epoch)", "val_acc": "val"},
             "accuracy", marker="o")
        print(f"wrote {out / 'metrics.json'} and {out / 'ckpt.pt'}")
    finish(run)


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:  # Ctrl-C outside the loop's own handling (loading, preparing data), or a second one
        fail("interrupted: the checkpoints written so far, if any, are as they were", 130)
