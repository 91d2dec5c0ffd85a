"""
Instruction fine-tuning of GPT-2, end to end: prepares the data and downloads the weights if needed, trains,
evaluates (val loss and sample answers), and leaves a checkpoint that sample.py can chat with.

    python finetune.py                                                  # gpt2 on Stanford Alpaca
    python finetune.py --model=gpt2-medium --dataset=instruction-data   # "Build a LLM from scratch" ch07
    torchrun --nproc_per_node=4 finetune.py ...                         # DDP on 4 GPUs
"""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from configurator import checked, configure, fail
from data import Split, length_grouped_batches, load_records, padding_fraction, tokenizer
from download import sha256_of
from generation import answer
from load_gpt2 import load_gpt2, model_from_checkpoint
from lora import add_lora
from model import PRESETS
from training import (RunLog, StopOnSigint, check_machinery, eta, evaluate_loss, finish, lora_settings, lr_at,
                      make_optimizer, optimizer_step, plot, prepare_dataset, read_resume_checkpoint,
                      restore_training_state, save_atomic, set_lr, start_run, stop_unless_finite, trainable_line,
                      training_state, wrap)

# -----------------------------------------------------------------------------
model = "gpt2"  # a GPT-2 name, a Hugging Face folder, a .safetensors file or a previous run's ckpt.pt
dataset = "alpaca"  # a prepare.py dataset name, or a path/URL to an Alpaca-format .json/.jsonl file
data_dir = "data"  # where prepare.py keeps datasets: data_dir/NAME
out_dir = ""  # where checkpoints and logs go; default: out/<dataset>
epochs = 2  # passes over the train split (unless max_iters is set)
max_iters = 0  # if > 0, train this many optimizer steps instead of `epochs`
batch_size = 8  # examples per micro-batch (per process)
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
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 0  # val batches per evaluation; 0 = the whole val split
eval_prompts = 3  # val examples answered greedily at every evaluation
log_interval = 10  # iterations between progress lines
max_new_tokens = 256  # for the sample answers and test_responses.json
test_responses = True  # at the end, answer every test example into out_dir/test_responses.json
seed = 1337  # the data's split and order, and the initial LoRA weights
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto, bfloat16, float16 or float32 (float32 turns autocast off)
compile_ = "auto"  # torch.compile the model: auto (on for CUDA only), True or False
resume = False  # continue from out_dir/ckpt.pt
grad_checkpoint = False  # recompute activations in backward: less memory, ~30% more compute
lora_rank = 0  # > 0: train LoRA adapters of this rank only, every weight of the model frozen; 0: train it all
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = "q,k,v,attn.c_proj,mlp.c_fc,mlp.c_proj,head"  # also attn.c_attn (q/k/v as one); head = lm_head
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = "nanoft"  # the W&B project name
# -----------------------------------------------------------------------------


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


def micro_batches_per_step(c, world):
    """grad_accum, or what global_batch_size makes of it."""
    if not c.global_batch_size:
        return c.grad_accum
    accum, rest = divmod(c.global_batch_size, c.batch_size * world)
    if rest or not accum:
        fail(f"global_batch_size={c.global_batch_size} is not a multiple of batch_size * processes "
             f"= {c.batch_size} * {world}")
    return accum


# ----------------------------------------------------------------------------- the model

def check_resumable(ckpt, c, lora, path):
    """Refuse to resume a checkpoint whose model or LoRA settings differ from this run's."""
    saved = ckpt["model_config"]
    if c.model in PRESETS and any(saved[k] != v for k, v in PRESETS[c.model].items()):
        fail(f"{path} holds a model with n_layer={saved['n_layer']}, n_embd={saved['n_embd']}, not "
             f"{c.model}: resume with the --model it was trained from, or use another out_dir")
    if ckpt.get("lora") != lora:
        fail(f"{path} was trained with LoRA settings {ckpt.get('lora')}, not {lora}: resume with the same "
             f"lora_* settings, or use another out_dir")


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

def forward_backward(net, split, micro_batches, mask_prompt, run, scaler):
    """One optimizer step's micro-batches, forward and backward (gradients summed over them, synced across
    processes at the last). Returns the step's mean loss, the same on every process, and the tokens it saw."""
    loss_sum, tokens = torch.zeros((), device=run.device), 0
    for i, indices in enumerate(micro_batches):
        x, y = split.batch(indices, mask_prompt, run.device)
        if run.ddp:  # gradients are averaged across processes only at the last micro-batch
            net.require_backward_grad_sync = i == len(micro_batches) - 1
        with run.autocast:
            _, loss = net(x, y)
        scaler.scale(loss / len(micro_batches)).backward()
        loss_sum += loss.detach() / len(micro_batches)
        tokens += x.numel() * run.world
    if run.ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum.item(), tokens


def show_answers(model, split, n, max_new_tokens, run, enc):
    """Print (and return) the model's greedy answers to the first n examples of split."""
    prompts = [split.prompt(i) for i in range(min(n, len(split)))]
    shown = []
    for prompt, ids in zip(prompts, answer(model, prompts, max_new_tokens, run.autocast)):
        text = enc.decode(ids).strip()
        instruction = enc.decode(prompt).rsplit("### Instruction:\n", 1)[-1].split("\n\n###")[0]
        print(f"  > {instruction[:100]}\n    {text[:300]!r}")
        shown.append({"instruction": instruction, "response": text})
    return shown


def write_test_responses(model, split, folder, out, max_new_tokens, run, enc, ckpt_path, it):
    records = load_records(folder, "test")
    t0 = time.time()
    answers = answer(model, [split.prompt(i) for i in range(len(split))], max_new_tokens, run.autocast)
    results = [{**record, "model_response": enc.decode(ids).strip()} for record, ids in zip(records, answers)]
    (out / "test_responses.json").write_text(json.dumps(results, indent=1))
    # which checkpoint gave these answers, and how: evaluate.py reuses them only for that very file
    info = {"checkpoint": ckpt_path.name, "sha256": sha256_of(ckpt_path), "iter_num": it,
            "max_new_tokens": max_new_tokens, "decoding": "greedy", "autocast": str(run.amp_dtype)}
    (out / "test_responses.meta.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {len(results)} answers to {out / 'test_responses.json'} in {time.time() - t0:.0f}s")


def main(config):
    c = checked(config, check_settings(config))
    run = start_run(c.device, c.dtype)
    accum = micro_batches_per_step(c, run.world)
    torch.manual_seed(c.seed)

    # data
    folder, meta = prepare_dataset(c.dataset, run, "instruction", "instruction records: finetune.py trains on "
                                   "Alpaca-format data (classify.py trains on labelled examples)",
                                   data_dir=c.data_dir, seed=c.seed, max_length=c.max_length)
    train, val, test = (Split(folder, s) for s in ("train", "val", "test"))
    out = Path(c.out_dir or Path("out") / folder.name)
    ckpt_path = out / "ckpt.pt"

    # model: fresh from `model`, or everything from out_dir/ckpt.pt when resuming
    lora = lora_settings(config)
    ckpt = read_resume_checkpoint(out) if c.resume else None
    if ckpt:
        check_resumable(ckpt, c, lora, ckpt_path)
    gpt = build_model(c, run, ckpt, lora, ckpt_path)
    optimizer = make_optimizer(gpt, c.lr, c.weight_decay, (c.beta1, c.beta2), run.device_type)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.amp_dtype == torch.float16)
    start_iter = restore_training_state(ckpt, optimizer, scaler) if ckpt else 0
    best_val = ckpt["best_val_loss"] if ckpt else float("inf")
    net = wrap(gpt, run, c.compile)

    # schedule: every process walks the same seeded batch order and takes every world-th micro-batch
    steps_per_epoch = len(length_grouped_batches(train.lengths, c.batch_size, c.seed, 0)) // (accum * run.world)
    if steps_per_epoch == 0:
        fail(f"the train split has {len(train)} examples: too few for batch_size={c.batch_size} x grad_accum="
             f"{accum} x {run.world} processes")
    total_iters = c.max_iters or c.epochs * steps_per_epoch
    enc = tokenizer()
    log = None
    if run.master:
        wandb = None
        if c.wandb_log:
            import wandb
            wandb.init(project=c.wandb_project, config=config)
        log = RunLog(out, c.resume, start_iter, wandb)
        grouped = length_grouped_batches(train.lengths, c.batch_size, c.seed, 0)
        shuffled = np.array_split(np.random.default_rng(c.seed).permutation(len(train)), len(grouped))
        print(f"{trainable_line(gpt, lora)} on {run.device}, autocast {run.amp_dtype}, {run.world} process(es); "
              f"{len(train)} train / {len(val)} val / {len(test)} test examples; {total_iters} iterations of "
              f"{c.batch_size * accum * run.world} examples; padding is {padding_fraction(grouped, train.lengths):.1%} "
              f"of tokens with length grouping ({padding_fraction(shuffled, train.lengths):.1%} without)")

    def save(path, it):
        save_atomic(checkpoint(gpt, optimizer, scaler, it, best_val, config, meta, lora), path)

    # the loop
    stop = StopOnSigint()
    batches, it, t_last, last_logged, dt_avg, tokens = {}, start_iter, time.time(), start_iter, None, 0
    while it < total_iters:
        epoch, step = divmod(it, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: length_grouped_batches(train.lengths, c.batch_size, c.seed, epoch)}
        lr_now = lr_at(it, total_iters, c.lr, c.min_lr, c.warmup_iters)
        set_lr(optimizer, lr_now)
        micro = [batches[epoch][(step * accum + m) * run.world + run.rank] for m in range(accum)]
        loss, n_tokens = forward_backward(net, train, micro, c.mask_prompt, run, scaler)
        stop_unless_finite(loss, it, c.lr, f"the last checkpoint, {ckpt_path}, is from before it"
                           if ckpt_path.exists() else "no checkpoint was written")
        optimizer_step(optimizer, scaler, gpt, c.grad_clip)
        it, tokens = it + 1, tokens + n_tokens

        if run.master and (it % c.log_interval == 0 or it in (start_iter + 1, total_iters)):  # the first at once
            now = time.time()
            dt = (now - t_last) / (it - last_logged)
            dt_avg = dt if dt_avg is None else 0.7 * dt_avg + 0.3 * dt
            print(f"iter {it}/{total_iters} | epoch {it / steps_per_epoch:.2f} | loss {loss:.4f} | lr {lr_now:.2e} "
                  f"| {tokens / (now - t_last):.0f} tok/s | {dt * 1000:.0f} ms/iter | ETA {eta(dt_avg * (total_iters - it))}",
                  flush=True)
            log.write({"iter": it, "epoch": it / steps_per_epoch, "loss": loss, "lr": lr_now,
                       "tokens_per_s": tokens / (now - t_last), "ms_per_iter": dt * 1000})
            t_last, last_logged, tokens = time.time(), it, 0
        if it % c.eval_interval == 0 or it == total_iters:
            val_loss = evaluate_loss(net, val, c.batch_size, c.eval_iters, c.mask_prompt, run)
            if run.master:
                print(f"iter {it}: val loss {val_loss:.4f}")
                answers = show_answers(gpt, val, c.eval_prompts, min(c.max_new_tokens, 64), run, enc)
                log.write({"iter": it, "val_loss": val_loss, "answers": answers})
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

    # the end: test loss and every test answer
    test_loss = evaluate_loss(net, test, c.batch_size, 0, c.mask_prompt, run)
    if run.master:
        print(f"test loss {test_loss:.4f} (best val loss {best_val:.4f})")
        log.write({"iter": it, "test_loss": test_loss})
        if c.test_responses:
            write_test_responses(gpt, test, folder, out, c.max_new_tokens, run, enc, ckpt_path, it)
        plot(log.records, out / "loss.png", "iter", {"loss": "train", "val_loss": "val"}, "loss")
        print(f"evaluate it: python evaluate.py --model={ckpt_path} --baseline={c.model} --max_new_tokens="
              f"{c.max_new_tokens} --out_dir={out / 'eval'}")
    finish(run)


if __name__ == "__main__":
    main(configure(globals()))
