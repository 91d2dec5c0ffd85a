"""
Fine-tuning of GPT-2, end to end, on instructions (Alpaca-format records) or on plain text (a book, a folder of
.txt files, FineWeb-style .jsonl): prepares the data and downloads the weights if needed, trains, evaluates (val
loss, perplexity, sample answers or continuations), and leaves a checkpoint that sample.py can use.

    python finetune.py                                                  # gpt2 on Stanford Alpaca
    python finetune.py --model=gpt2-medium --dataset=instruction-data   # "Build a LLM from scratch" ch07
    python finetune.py --dataset=book.txt --block_size=512              # a language model of your text
    python finetune.py --model=out/book/ckpt.pt --dataset=book.txt --eval_only=True   # its perplexity, no training
    torchrun --nproc_per_node=4 finetune.py ...                         # DDP on 4 GPUs
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import (RunLog, SaveError, check_out_dir, claim_out_dir, read_resume_checkpoint,
                         restore_training_state, resumed_config, save_atomic, training_state)
from configurator import checked, configure, fail, given_keys
from data import Split, TextSplit, length_grouped_batches, load_records, padding_fraction, tokenizer
from download import sha256_of
from generation import answer, clock
from load_gpt2 import load_gpt2, model_from_checkpoint
from lora import add_lora
from training import (StopOnSigint, check_machinery, dataset_folder, evaluate_loss, finish, lora_settings, lr_at,
                      make_optimizer, optimizer_step, plot, prepare_dataset, set_lr, start_run, stop_unless_finite,
                      trainable_line, wrap)
from weights import atomic_write

# -----------------------------------------------------------------------------
model = "gpt2"  # a GPT-2 name, a Hugging Face folder, a .safetensors file or a previous run's ckpt.pt
dataset = "alpaca"  # a prepare.py dataset, or a path/URL: Alpaca .json/.jsonl, text .txt/.jsonl, a folder of them
data_dir = "data"  # where prepare.py keeps datasets: data_dir/NAME
out_dir = ""  # where checkpoints and logs go; default: out/<dataset>
epochs = 2  # passes over the train split (unless max_iters is set)
max_iters = 0  # if > 0, train this many optimizer steps instead of `epochs`
batch_size = 8  # examples (or text windows) per micro-batch (per process)
grad_accum = 1  # micro-batches per optimizer step
global_batch_size = 0  # if > 0, grad_accum is derived: global_batch_size / (batch_size * processes)
lr = 5e-5  # the peak learning rate of AdamW
min_lr = 5e-6  # the cosine schedule ends here
warmup_iters = 0  # iterations of linear warmup from 0 to lr
weight_decay = 0.1  # AdamW's, on weight matrices only
beta1 = 0.9  # AdamW's first-moment decay
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # clip the gradient norm to this; 0 = off
dropout = 0.0  # dropout in every block while training (OpenAI trained GPT-2 with 0.1)
mask_prompt = False  # True: train on the response tokens only
max_length = 1024  # longer examples are dropped by prepare
block_size = 0  # text datasets: tokens per training window; 0: the model's context
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 0  # val batches per evaluation; 0 = the whole val split (text: at most 200 batches)
eval_prompts = 3  # val examples answered (text: continued) greedily at every evaluation
eval_only = False  # evaluate the model (val and test loss, perplexity) and stop: nothing is trained or written
log_interval = 10  # iterations between progress lines
max_new_tokens = 256  # for the sample answers and test_responses.json
test_responses = True  # at the end, answer every test example into out_dir/test_responses.json
seed = 1337  # the data's split and order, and the initial LoRA weights
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto, bfloat16, float16 or float32 (float32 turns autocast off)
compile_ = "auto"  # torch.compile the model: auto (on for CUDA only), True or False
resume = False  # continue out_dir/ckpt.pt: its settings are used, except those given that may change (README)
overwrite = False  # start over in an out_dir that holds an earlier run's results (they are deleted)
grad_checkpoint = False  # recompute activations in backward: less memory, ~30% more compute
lora_rank = 0  # > 0: train LoRA adapters of this rank only, every weight of the model frozen; 0: train it all
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj,head"  # also attn.c_attn (q/k/v as one); head = lm_head
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = "nanoft"  # the W&B project name
# -----------------------------------------------------------------------------

MAY_CHANGE = {"resume", "out_dir", "data_dir", "epochs", "max_iters", "eval_interval", "eval_iters", "eval_prompts",
              "log_interval", "max_new_tokens", "test_responses", "device", "dtype", "compile", "grad_checkpoint",
              "wandb_log", "wandb_project"}  # what a resumed run may change: where, how long, how often, on what
TEXT_EVAL_BATCHES = 200  # eval_iters=0 on a text dataset: the val split's first 200 batches (a corpus can be huge)


def check_settings(config):
    """Catch impossible values before anything is loaded; returns the list of problems."""
    c = config
    problems = [f"{k}={c[k]} must be at least 1" for k in ("batch_size", "grad_accum", "log_interval",
                                                          "eval_interval", "max_new_tokens") if c[k] < 1]
    problems += [f"{k}={c[k]} must not be negative" for k in ("lr", "min_lr", "weight_decay", "grad_clip",
                                                             "warmup_iters", "max_iters", "eval_iters",
                                                             "global_batch_size", "eval_prompts") if c[k] < 0]
    if c["max_iters"] == 0 and c["epochs"] < 1:
        problems.append(f"epochs={c['epochs']} must be at least 1 (or set max_iters)")
    if c["block_size"] < 0:
        problems.append(f"block_size={c['block_size']} must be 0 (the model's context) or a number of tokens")
    if c["eval_only"] and c["resume"]:
        problems.append("eval_only=True evaluates a model: give it as --model=out/.../ckpt.pt, without resume")
    return problems + check_machinery(c)


def micro_batches_per_step(c, world):
    """grad_accum, or what global_batch_size makes of it."""
    if not c.global_batch_size:
        return c.grad_accum
    accum, rest = divmod(c.global_batch_size, c.batch_size * world)
    if rest or not accum:
        fail(f"global_batch_size={c.global_batch_size} is not a multiple of batch_size * processes "
             f"= {c.batch_size} * {world}")
    return accum


# ----------------------------------------------------------------------------- the two kinds of data

class Instructions:
    """An instruction dataset: examples, length-grouped into padded batches; answers are what it shows."""
    splits = ("train", "val", "test")

    def __init__(self, folder, c, run):
        self.folder, self.c, self.run = folder, c, run
        self.train, self.val, self.test = (Split(folder, s) for s in self.splits)
        self.order = (None, None)  # (epoch, its batches)

    def steps_per_epoch(self, accum):
        return len(length_grouped_batches(self.train.lengths, self.c.batch_size, self.c.seed, 0)) // (accum * self.run.world)

    def micro_batch(self, it, micro, accum, steps_per_epoch):
        """The micro-batch of iteration it: every process walks the same seeded batch order, each taking every
        world-th batch."""
        epoch, step = divmod(it, steps_per_epoch)
        if self.order[0] != epoch:
            self.order = (epoch, length_grouped_batches(self.train.lengths, self.c.batch_size, self.c.seed, epoch))
        return self.train.batch(self.order[1][(step * accum + micro) * self.run.world + self.run.rank],
                                self.c.mask_prompt, self.run.device)

    def eval_batches(self, split, max_batches):
        return split.eval_batches(self.c.batch_size, max_batches, self.c.mask_prompt, self.run.rank, self.run.world,
                                  self.run.device)

    def check_fits(self, gpt):
        """Every example must fit the model's context (its inputs are one token shorter than the example)."""
        longest = max(int(split.lengths.max()) for split in (self.train, self.val, self.test) if len(split))
        if longest - 1 > gpt.config.block_size:
            fail(f"dataset '{self.c.dataset}' has examples of up to {longest} tokens but the model's context is "
                 f"{gpt.config.block_size}: set --max_length={gpt.config.block_size + 1} (longer examples are "
                 f"dropped, or cut with truncate=True in prepare.py)")

    def describe(self):
        grouped = length_grouped_batches(self.train.lengths, self.c.batch_size, self.c.seed, 0)
        shuffled = np.array_split(np.random.default_rng(self.c.seed).permutation(len(self.train)), len(grouped))
        return (f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test examples; padding is "
                f"{padding_fraction(grouped, self.train.lengths):.1%} of tokens with length grouping "
                f"({padding_fraction(shuffled, self.train.lengths):.1%} without)")

    def show_samples(self, gpt, n, max_new_tokens, enc):
        """Print (and return) the model's greedy answers to the first n val examples."""
        prompts = [self.val.prompt(i) for i in range(min(n, len(self.val)))]
        shown = []
        for prompt, ids in zip(prompts, answer(gpt, prompts, max_new_tokens, self.run.autocast)):
            text = enc.decode(ids).strip()
            instruction = enc.decode(prompt).rsplit("### Instruction:\n", 1)[-1].split("\n\n###")[0]
            print(f"  > {instruction[:100]}\n    {text[:300]!r}")
            shown.append({"instruction": instruction, "response": text})
        return shown

    def write_test_responses(self, gpt, out, max_new_tokens, enc, ckpt_path, it):
        """Every test example answered, beside its reference: out/test_responses.json, and beside it which
        checkpoint answered and how (evaluate.py reuses the answers only for that very file)."""
        records = load_records(self.folder, "test")
        t0 = time.time()
        answers = answer(gpt, [self.test.prompt(i) for i in range(len(self.test))], max_new_tokens, self.run.autocast,
                         what="test answers")
        results = [{**record, "model_response": enc.decode(ids).strip()} for record, ids in zip(records, answers)]
        info = {"checkpoint": ckpt_path.name, "sha256": sha256_of(ckpt_path), "iter_num": it,
                "max_new_tokens": max_new_tokens, "decoding": "greedy", "autocast": str(self.run.amp_dtype)}
        atomic_write(out / "test_responses.json", [json.dumps(results, indent=1).encode()])
        atomic_write(out / "test_responses.meta.json", [json.dumps(info, indent=1).encode()])
        print(f"wrote {len(results)} answers to {out / 'test_responses.json'} in {time.time() - t0:.0f}s")


class Text:
    """A text dataset: its token stream, read as windows of block_size tokens at random places (nanoGPT's way);
    continuations of the val text are what it shows. It has no test split."""
    splits = ("train", "val")

    def __init__(self, folder, c, run):
        self.folder, self.c, self.run = folder, c, run
        self.train, self.val = (TextSplit(folder, s) for s in self.splits)
        self.test, self.block_size = None, c.block_size

    def steps_per_epoch(self, accum):
        return self.train.tokens // (self.c.batch_size * self.block_size * accum * self.run.world)

    def micro_batch(self, it, micro, accum, steps_per_epoch):
        """Windows drawn from a generator seeded by the seed, the process's rank and the step: each process draws
        its own, and a resumed run draws what the interrupted one would have."""
        return self.train.random_batch(self.c.batch_size, self.block_size, [self.c.seed, self.run.rank, it, micro],
                                       self.run.device)

    def eval_batches(self, split, max_batches):
        return split.eval_batches(self.c.batch_size, max_batches or TEXT_EVAL_BATCHES, self.block_size, self.run.rank,
                                  self.run.world, self.run.device)

    def check_fits(self, gpt):
        self.block_size = self.c.block_size or gpt.config.block_size
        if self.block_size > gpt.config.block_size:
            fail(f"block_size={self.block_size} is longer than the model's context ({gpt.config.block_size})")
        shortest = min(self.train.tokens, self.val.tokens)
        if shortest <= self.block_size:
            fail(f"dataset '{self.c.dataset}' has a split of only {shortest} tokens, not enough for one window of "
                 f"block_size={self.block_size}: set a smaller --block_size, or give more text")

    def describe(self):
        return (f"{self.train.tokens:,} train / {self.val.tokens:,} val tokens in windows of {self.block_size}; "
                f"{self.steps_per_epoch(1) * self.run.world:,} windows of {self.c.batch_size} make an epoch")

    def show_samples(self, gpt, n, max_new_tokens, enc):
        """Print (and return) the model's greedy continuations of n prompts taken from the val text."""
        starts = self.val.starts(self.block_size)
        picked = [starts[i * len(starts) // n] for i in range(n)] if n and starts else []
        prompts = [self.val.window(k, start, 31).tolist() for k, start in picked]  # 32 tokens of val text
        shown = []
        for prompt, ids in zip(prompts, answer(gpt, prompts, max_new_tokens, self.run.autocast)):
            print(f"  > {enc.decode(prompt)[-100:]!r}\n    {enc.decode(ids)[:300]!r}")
            shown.append({"prompt": enc.decode(prompt), "continuation": enc.decode(ids)})
        return shown


# ----------------------------------------------------------------------------- the model

def check_same_data(ckpt, meta, path):
    """Refuse to resume on a dataset that changed since the run began (its file, split or tokenization)."""
    saved = ckpt["meta"]
    if any(saved.get(k) != meta.get(k) for k in ("sha256", "seed", "max_length", "splits")):
        fail(f"{path} was trained on {saved.get('name')} as prepared from sha256 {str(saved.get('sha256'))[:12]}... "
             f"with splits {saved.get('splits')}; it is now {str(meta.get('sha256'))[:12]}... with {meta.get('splits')}: "
             f"the data changed, so the run cannot go on exactly; start a new run in another --out_dir")


def build_model(c, run, ckpt, lora, path):
    """The model to train: `model` loaded (with fresh LoRA adapters), or a resumed checkpoint's, adapters unmerged."""
    try:
        if ckpt:
            gpt = model_from_checkpoint(ckpt, run.device, dropout=c.dropout, merge_lora=False, path=path)
        else:
            gpt = load_gpt2(c.model, device=run.device, dropout=c.dropout)
    except Exception as e:  # downloads, hostile or mismatched files: all explained in the message
        fail(f"could not load model '{path if ckpt else c.model}': {e}")
    if lora and not ckpt:
        add_lora(gpt, **lora)
    gpt.grad_checkpoint = c.grad_checkpoint
    return gpt.train()


def checkpoint(model, optimizer, scaler, it, best_val, config, meta, lora):
    return {"model": model.state_dict(), "model_config": asdict(model.config), **training_state(optimizer, scaler, it),
            "best_val_loss": best_val, "config": config, "meta": meta, "template": meta.get("template"), "lora": lora}


# ----------------------------------------------------------------------------- training

def forward_backward(net, batches, run, scaler):
    """One optimizer step's micro-batches (inputs, targets), forward and backward (gradients summed over them,
    synced across processes at the last). Returns the step's mean loss, the same on every process, and the
    tokens it saw."""
    loss_sum, tokens = torch.zeros((), device=run.device), 0
    for i, (x, y) in enumerate(batches):
        if run.ddp:  # gradients are averaged across processes only at the last micro-batch
            net.require_backward_grad_sync = i == len(batches) - 1
        with run.autocast:
            _, loss = net(x, y)
        scaler.scale(loss / len(batches)).backward()
        loss_sum += loss.detach() / len(batches)
        tokens += x.numel() * run.world
    if run.ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum.item(), tokens


def losses_line(losses):
    """'val loss 2.1044, perplexity 8.20 | test loss ...' for {split: mean loss per token}."""
    return " | ".join(f"{split} loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f}"
                      for split, loss in losses.items())


def evaluate_only(data, gpt, c, run):
    """eval_only=True: the model's loss and perplexity on the val (and test) split, nothing trained or written."""
    losses = {split: evaluate_loss(gpt, data.eval_batches(getattr(data, split), c.eval_iters if split == "val" else 0),
                                   run, f"{split} loss") for split in data.splits[1:]}
    if run.master:
        print(f"{c.model} on {c.dataset}: {losses_line(losses)}")
    finish(run)


def main(config):
    c = checked(config, check_settings(config))
    out = Path(c.out_dir or Path("out") / dataset_folder(c.dataset)).expanduser()
    ckpt_path, ckpt = out / "ckpt.pt", None
    if not c.eval_only and int(os.environ.get("RANK", 0)) == 0:  # an earlier run's results: refused before any work
        check_out_dir(out, c.resume, c.overwrite)
    if c.resume:  # the run's own settings, but for those given that may change
        ckpt = read_resume_checkpoint(out, {"best_val_loss": float})
        config = resumed_config(config, ckpt, given_keys(), MAY_CHANGE, ckpt_path)
        c = checked(config, check_settings(config))
    run = start_run(c.device, c.dtype)
    accum = micro_batches_per_step(c, run.world)
    torch.manual_seed(c.seed)
    try:
        enc = tokenizer()  # for the samples; offline, it needs TIKTOKEN_CACHE_DIR: say so now
    except OSError as e:
        fail(str(e))

    # data: instructions or text
    folder, meta = prepare_dataset(c.dataset, run, ("instruction", "text"), "instruction records or text: "
                                   "finetune.py trains on those (classify.py on labelled examples)",
                                   data_dir=c.data_dir, seed=c.seed, max_length=c.max_length)
    data = (Text if meta["kind"] == "text" else Instructions)(folder, c, run)
    if ckpt:
        check_same_data(ckpt, meta, ckpt_path)

    # model: fresh from `model`, or everything from out_dir/ckpt.pt when resuming
    lora = lora_settings(config)
    gpt = build_model(c, run, ckpt, lora, ckpt_path)
    data.check_fits(gpt)
    if c.eval_only:
        return evaluate_only(data, gpt, c, run)
    if run.master:  # the model is loaded: only now may an earlier run's results be replaced
        claim_out_dir(out, c.resume, c.overwrite)
    optimizer = make_optimizer(gpt, c.lr, c.weight_decay, (c.beta1, c.beta2), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.amp_dtype == torch.float16)
    start_iter = restore_training_state(ckpt, optimizer, scaler, ckpt_path) if ckpt else 0
    best_val = ckpt["best_val_loss"] if ckpt else float("inf")
    net = wrap(gpt, run, c.compile)

    # schedule
    steps_per_epoch = data.steps_per_epoch(accum)
    if steps_per_epoch == 0:
        fail(f"the train split of '{c.dataset}' is too small for one step of batch_size={c.batch_size} x grad_accum="
             f"{accum} x {run.world} processes")
    total_iters = c.max_iters or c.epochs * steps_per_epoch
    if ckpt and total_iters <= start_iter:
        fail(f"{ckpt_path} is already at iteration {start_iter} of the {total_iters} asked for: give more "
             f"--max_iters (or --epochs) to train longer")
    log = None
    if run.master:
        wandb = None
        if c.wandb_log:
            import wandb
            wandb.init(project=c.wandb_project, config=config)
        log = RunLog(out, start_iter, c.resume, wandb)
        print(f"{trainable_line(gpt, lora)} on {run.device}, autocast {run.amp_dtype}, {run.world} process(es); "
              f"{total_iters} iterations of {c.batch_size * accum * run.world}; {data.describe()}")

    def save(path, it):
        try:
            save_atomic(checkpoint(gpt, optimizer, scaler, it, best_val, config, meta, lora), path)
        except SaveError as e:
            fail(str(e), status=1)

    # the loop
    stop = StopOnSigint()
    it, t_last, last_logged, dt_avg, tokens = start_iter, time.time(), start_iter, None, 0
    while it < total_iters:
        lr_now = lr_at(it, total_iters, c.lr, c.min_lr, c.warmup_iters)
        set_lr(optimizer, lr_now)
        batches = [data.micro_batch(it, m, accum, steps_per_epoch) for m in range(accum)]
        loss, n_tokens = forward_backward(net, batches, run, scaler)
        stop_unless_finite(loss, it, c.lr, f"the last checkpoint, {ckpt_path}, is from before it"
                           if ckpt_path.exists() else "no checkpoint was written")
        optimizer_step(optimizer, scaler, gpt, c.grad_clip)
        it, tokens = it + 1, tokens + n_tokens

        if run.master and (it % c.log_interval == 0 or it in (start_iter + 1, total_iters)):  # the first at once
            now = time.time()
            dt = (now - t_last) / (it - last_logged)
            dt_avg = dt if dt_avg is None else 0.7 * dt_avg + 0.3 * dt
            print(f"iter {it}/{total_iters} | epoch {it / steps_per_epoch:.2f} | loss {loss:.4f} | lr {lr_now:.2e} "
                  f"| {tokens / (now - t_last):.0f} tok/s | {dt * 1000:.0f} ms/iter | ETA {clock(dt_avg * (total_iters - it))}",
                  flush=True)
            log.write({"iter": it, "epoch": it / steps_per_epoch, "loss": loss, "lr": lr_now,
                       "tokens_per_s": tokens / (now - t_last), "ms_per_iter": dt * 1000})
            t_last, last_logged, tokens = time.time(), it, 0
        if it % c.eval_interval == 0 or it == total_iters:
            val_loss = evaluate_loss(net, data.eval_batches(data.val, c.eval_iters), run, "val loss")
            if run.master:
                print(f"iter {it}: {losses_line({'val': val_loss})}")
                samples = data.show_samples(gpt, c.eval_prompts, min(c.max_new_tokens, 64), enc)
                log.write({"iter": it, "val_loss": val_loss, "samples": samples})
                if val_loss < best_val:
                    best_val = val_loss
                    save(out / "best.pt", it)
                save(ckpt_path, it)
            t_last, last_logged, tokens = time.time(), it, 0  # evaluation time is not training time
        if stop.requested:
            if run.master:
                save(ckpt_path, it)
                print(f"saved {ckpt_path} at iteration {it}; continue with --resume=True")
            sys.exit(130)

    # the end: the test split's loss and answers (instruction data); a text dataset has its val loss above
    if data.test is not None:
        test_loss = evaluate_loss(net, data.eval_batches(data.test, 0), run, "test loss")
        if run.master:
            print(f"{losses_line({'test': test_loss})} (best val loss {best_val:.4f})")
            log.write({"iter": it, "test_loss": test_loss})
            if c.test_responses:
                data.write_test_responses(gpt, out, c.max_new_tokens, enc, ckpt_path, it)
            print(f"evaluate it: python evaluate.py --model={ckpt_path} --baseline={c.model} --max_new_tokens="
                  f"{c.max_new_tokens} --out_dir={out / 'eval'}")
    if run.master:
        plot(log.records, out / "loss.png", "iter", {"loss": "train", "val_loss": "val"}, "loss")
        if data.test is None:
            print(f"its perplexity on any text: python finetune.py --model={ckpt_path} --dataset=<text> "
                  f"--block_size={data.block_size} --eval_only=True")
    finish(run)


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:  # Ctrl-C outside the loop's own handling (loading, preparing data), or a second one
        fail("interrupted: the checkpoints written so far, if any, are as they were", 130)
