"""
nanoFT's tests, in one file. The reference is Hugging Face transformers' GPT2LMHeadModel (a test-only
dependency): random-init models saved with save_pretrained, so the files are real files in the real format.
Downloads are tested against a hub-like server on 127.0.0.1. Run: python -m pytest test_all.py
"""

import collections
import hashlib
import http.server
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiktoken
import torch

import download
import evaluate as ev
import hellaswag as hs
import judge as jg
import load_gpt2
import metrics
import prepare as pp
import readers
from classify import (Classifier, LabelledSplit, collate_labelled, freeze, head_trains_unless_adapted, load_classifier,
                      pool)
from configurator import config_keys, configure
from data import (ALPACA_TEMPLATE, IGNORE, Split, TextSplit, collate, format_prompt, length_grouped_batches, load_records,
                  load_split, padding_fraction)
from download import DownloadError
from gguf_export import DTYPES, chat_template, export_gguf, gpt2_vocab, ollama_template
from generation import PIECE_ROWS, Progress, TextStream, answer, answer_batch_size, head_logprobs, until_eot
from load_gpt2 import export_hf, load_gpt2 as load, read_checkpoint
from lora import LORA_TARGETS, LoRALinear, add_lora, merge_lora
from model import GPT, GPTConfig, decode_attention, filter_logits, sample_next
from prepare import prepare
from quantize import Int8Linear, RowsLinear, choose_decode_kernel, plain_linear, quantize_int8, use_kernel
from checkpoints import RunLog, read_log, save_atomic
from training import Run, evaluate_loss, lora_settings, make_optimizer, trainable_line
from weights import read_safetensors, write_safetensors

transformers = pytest.importorskip("transformers", reason="the reference implementation: pip install -r requirements-dev.txt")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

HERE = Path(__file__).resolve().parent
EOT = 50256
transformers.logging.set_verbosity_error()


def reference_model(seed=0, **config):
    """A random-init transformers GPT-2 in eval mode (dropout off), fp32."""
    torch.manual_seed(seed)
    defaults = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=128,
                    bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**defaults, **config})).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny reference model and the folder save_pretrained wrote it to."""
    folder = tmp_path_factory.mktemp("tiny")
    hf = reference_model()
    hf.save_pretrained(folder)
    return hf, folder


def free_port():
    """A TCP port nobody listens on now, for torchrun's rendezvous (a fixed one collides with other runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupted_at(prefix, cmd, cwd):
    """Run cmd and send it SIGINT, as Ctrl-C does, once a line of its output starts with prefix: returns
    (exit status, the output that came after that line)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(prefix):
            proc.send_signal(2)
            break
    rest = proc.stdout.read()  # before wait(): a full pipe would block the process
    return proc.wait(), rest


def max_logit_diff(hf, ours, idx):
    with torch.no_grad():
        return (hf(idx).logits - ours(idx)[0]).abs().max().item()


# ----------------------------------------------------------------------------- parity with the reference

def test_logits_match_reference_on_tiny_config(tiny):
    hf, folder = tiny
    idx = torch.randint(0, 50257, (3, 100), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(hf, load(folder), idx) <= 1e-5


def test_logits_match_reference_on_full_gpt2_config(tmp_path):
    hf = reference_model(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == 124_439_808
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    assert max_logit_diff(hf, ours, idx) <= 1e-4


def test_loss_matches_reference_with_ignored_labels(tiny):
    hf, folder = tiny
    ours = load(folder)
    idx = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(3))
    labels = idx.clone()
    labels[0, :10] = -100  # e.g. a masked prompt
    labels[1, 25:] = -100  # e.g. padding
    with torch.no_grad():
        ref = hf(idx, labels=labels).loss  # transformers shifts the labels itself
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
        _, loss = ours(idx, targets)
    assert abs(ref.item() - loss.item()) <= 1e-5


def test_training_gradients_match_reference(tmp_path):
    # in training mode on the CPU attention runs as plain matmuls (attention_by_matmul), not SDPA
    hf = reference_model(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path).train()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(4))
    hf(idx, labels=idx).loss.backward()
    _, loss = ours(idx, torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1))
    loss.backward()
    ref_attn = hf.transformer.h[1].attn.c_attn.weight.grad.t()  # transformers' Conv1D stores (in, out)
    assert torch.allclose(ours.h[1].attn.c_attn.weight.grad, ref_attn, atol=1e-7, rtol=1e-4)
    assert torch.allclose(ours.wte.weight.grad, hf.transformer.wte.weight.grad, atol=1e-7, rtol=1e-4)


def test_generation_in_training_mode_equals_eval_mode(tiny):
    # training mode on the CPU takes the matmul attention; decoding through the KV cache must not
    gpt = load(tiny[1])
    prompt = torch.randint(0, 50257, (2, 7), generator=torch.Generator().manual_seed(5))
    assert torch.equal(gpt.train().generate(prompt, 12, temperature=0), gpt.eval().generate(prompt, 12, temperature=0))
    # and a forward over left-padded rows: the matmul attention's mask is the same as SDPA's
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :3] = False
    with torch.no_grad():
        trained, evaluated = gpt.train()(prompt, valid=valid)[0], gpt.eval()(prompt, valid=valid)[0]
    assert torch.allclose(trained, evaluated, atol=1e-5)


def hub_style_state_dict(hf):
    """Tensors named as in OpenAI's files on the hub: no 'transformer.' prefix, no lm_head, mask buffers."""
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    return sd


def test_loads_hub_style_names_without_prefix_and_with_mask_buffers(tiny, tmp_path):
    from safetensors.torch import save_file  # the reference writer, not ours
    hf, folder = tiny
    save_file(hub_style_state_dict(hf), tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    idx = torch.randint(0, 50257, (1, 40))
    assert max_logit_diff(hf, load(tmp_path), idx) <= 1e-5


def test_bare_safetensors_file_reads_sizes_off_the_tensors(tmp_path):
    from safetensors.torch import save_file
    hf = reference_model(n_embd=128, n_head=2)  # 64-dim heads, as in every OpenAI GPT-2
    save_file(hub_style_state_dict(hf), tmp_path / "gpt2.safetensors")
    ours = load(tmp_path / "gpt2.safetensors")
    assert (ours.config.n_layer, ours.config.n_head, ours.config.block_size) == (2, 2, 128)
    assert max_logit_diff(hf, ours, torch.randint(0, 50257, (1, 40))) <= 1e-5


def test_f16_file_loads_as_float32(tiny, tmp_path):
    hf, _ = tiny
    half = reference_model().half()
    half.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.wte.weight.dtype == torch.float32
    idx = torch.randint(0, 50257, (1, 40))
    assert max_logit_diff(half.float(), ours, idx) <= 1e-5
    assert load(tmp_path, dtype=torch.bfloat16).wte.weight.dtype == torch.bfloat16


def test_greedy_generation_matches_reference(tiny):
    hf, folder = tiny
    ours = load(folder)
    prompt = torch.randint(1, 50257, (1, 8), generator=torch.Generator().manual_seed(4))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, 40, temperature=0), ref)
    assert torch.equal(ours.generate(prompt, 40, temperature=0, use_cache=False), ref)


def test_kv_cache_logits_equal_full_recompute_at_every_step(tiny):
    ours = load(tiny[1])
    idx = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(5))
    full, _ = ours(idx)
    ours.setup_cache(2, 30)
    prefill, _ = ours(idx[:, :10], pos=0)
    steps = [prefill] + [ours(idx[:, t:t + 1], pos=t)[0] for t in range(10, 30)]
    ours.clear_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_kv_cache_decoding_under_bf16_autocast_keeps_attention_in_the_caches_float32(tiny):
    # under autocast the Linears run in bf16, but a decode step's attention reads the cache in the weights' dtype
    # (SDPA's CPU kernel reads bf16 slower than float32): the cache is never cast, and the steps stay as close to
    # the float32 logits as a bf16 forward of the whole sequence is
    ours = load(tiny[1])
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(6))
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, :5] = False  # a left-padded row
    with torch.no_grad():
        full = ours(idx, valid=valid)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_full = ours(idx, valid=valid)[0].float()
            ours.setup_cache(2, 24)
            steps = [ours(idx[:, :8], pos=0, valid=valid[:, :8])[0]]
            steps += [ours(idx[:, t:t + 1], pos=t, valid=valid[:, :t + 1])[0] for t in range(8, 24)]
    assert all(block.attn.kv_cache.k.dtype == block.attn.kv_cache.v.dtype == torch.float32 for block in ours.h)
    ours.clear_cache()
    decoded = torch.cat(steps, dim=1).float()
    assert (decoded - full)[valid].abs().max() <= 1.5 * (bf16_full - full)[valid].abs().max()
    assert (decoded - full)[valid].abs().max() > 0  # autocast did run the Linears in bf16
    # the attention itself: in the cache's float32 under autocast, and what SDPA gives with the bool mask
    q, k, v = (torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(seed))
               for n, seed in ((1, 0), (10, 1), (10, 2)))
    mask = valid[:, None, None, :10]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = decode_attention(q.bfloat16(), k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.bfloat16().float(), k, v, attn_mask=mask)
    assert y.dtype == torch.float32 and torch.allclose(y, ref, atol=1e-6)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny):
    ours = load(tiny[1])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    batch = ours.generate(idx, 20, temperature=0, valid=valid)
    for row, p in zip(batch, prompts):
        alone = ours.generate(torch.tensor([p]), 20, temperature=0)[0]
        assert row[width - len(p):].tolist() == alone.tolist()
    # answers (finetune's test answers, evaluate's) decode as many rows as a 2 GB KV cache holds, up to 32
    many = [list(range(1, 3 + i % 9)) for i in range(40)]
    assert answer(ours, many, 12) == answer(ours, many, 12, batch_size=1)
    with torch.device("meta"):
        medium = GPT(GPTConfig.from_name("gpt2-medium"))  # its KV cache: 196 KB a token a row in fp32
    # room for the prompt, its answer and the answers of rows joining later: 2 GB / ((60 + 2 x 256) x 196 KB)
    assert answer_batch_size(ours, 60, 256) == 32 and answer_batch_size(medium, 60, 256) == 19


def test_progress_of_answers_that_all_end_late_still_moves(capsys):
    # rows that all run to max_new_tokens end together; until then the line counts the tokens written so far
    progress = Progress("test answers", 4, "prompts", quiet=0)
    progress.update(0, partial=0.0)  # nothing done at all: no line (and no ETA divided by zero)
    progress.update(0, partial=1.0)  # four rows a quarter written
    progress.shown = 0  # the next line is due at once
    progress.update(4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("test answers: 0/4 prompts (25%) |") and "ETA 0m0" in lines[0]
    assert lines[1].startswith("test answers: 4/4 prompts (100%) |") and "done in" in lines[1]


def test_head_piece_size_is_timed_on_the_scored_rows_and_changes_no_result(monkeypatch):
    # how many rows of logits are made at a time is timed on this machine, on the rows being scored (each size
    # three times, 256 rows a chunk), then kept per dtype; whichever size runs, the answer is the full logits'
    pieces, timings = {}, {}
    monkeypatch.setattr("generation.piece_rows", pieces)
    monkeypatch.setattr("generation.piece_timings", timings)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    hidden, wanted = torch.randn(8 * 256 + 7, 16), torch.randint(0, 50257, (8 * 256 + 7,))
    with torch.no_grad():
        full = torch.log_softmax(gpt.lm_head(hidden), -1).gather(1, wanted[:, None])[:, 0]
        assert torch.allclose(head_logprobs(gpt, hidden, wanted), full, atol=1e-5)  # 8 chunks timed, the rest not
        assert not pieces and sorted(map(len, timings["cpu", torch.float32, (50257, 16)].values())) == [2, 3, 3]
        assert torch.allclose(head_logprobs(gpt, hidden[:300], wanted[:300]), full[:300], atol=1e-5)  # the 9th
        assert pieces["cpu", torch.float32, (50257, 16)] in PIECE_ROWS  # chosen, for this process
        assert torch.allclose(head_logprobs(gpt, hidden, wanted), full, atol=1e-5)
        with torch.autocast("cpu", torch.bfloat16):  # bf16 is timed for itself
            assert (head_logprobs(gpt, hidden[:300], wanted[:300]) - full[:300]).abs().max() < 0.05
        assert [len(t) for t in timings["cpu", torch.bfloat16, (50257, 16)].values()] == [1, 0, 0]
        assert ("cpu", torch.bfloat16, (50257, 16)) not in pieces


def test_loss_progress_counts_tokens_as_batches_grow_longer(monkeypatch):
    # evaluation batches run shortest first: counted in batches, the ETA halfway through would be far too short
    shown = []

    class Recorded(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            shown.append(self)

    monkeypatch.setattr("training.Progress", Recorded)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64))
    batches = [(torch.zeros(2, n, dtype=torch.long), torch.zeros(2, n, dtype=torch.long)) for n in (4, 16, 44)]
    evaluate_loss(gpt, batches, Run(0, 1, False, "cpu"))
    assert [(p.unit, p.total, p.done) for p in shown] == [("tokens", 128, 128)]


def test_answers_of_different_lengths_are_each_what_the_prompt_gets_alone():
    # continuous batching: when an answer ends, the next prompt takes its row (its keys and values written beside
    # the others', the cache's unused columns cut off as it fills); a model made to end often at <|endoftext|>
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():
        gpt.wte.weight[EOT] *= 4.0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(40)]
    prompts += [list(range(1, 60)), [7] * 62, []]  # near the 64-token context, and an empty one
    alone = [until_eot(gpt.generate(torch.tensor([p or [EOT]]), 16, temperature=0)[0, len(p or [EOT]):].tolist())
             for p in prompts]
    assert len({len(a) for a in alone}) > 8 and sum(len(a) == 16 for a in alone) > 10  # short, long and cut ones
    for rows in (1, 3, 8, 32):
        assert answer(gpt, prompts, 16, batch_size=rows) == alone
    assert answer(gpt, [[1, 2]], 0) == [[]] and answer(gpt, [], 16) == []

    class Interrupted(Progress):  # Ctrl-C (or any error) half-way: the model is left as it was found
        def update(self, n=1, partial=0.0):
            raise KeyboardInterrupt
    gpt.train()
    with pytest.raises(KeyboardInterrupt):
        answer(gpt, prompts, 16, progress=Interrupted("answers", len(prompts)))
    assert gpt.training and all(block.attn.kv_cache is None for block in gpt.h)


def test_sampling_knobs(tiny):
    ours = load(tiny[1])
    prompt = torch.tensor([[1, 2, 3]])
    greedy = ours.generate(prompt, 15, temperature=0)
    assert torch.equal(ours.generate(prompt, 15, temperature=1.0, top_k=1), greedy)
    a = ours.generate(prompt, 15, generator=torch.Generator().manual_seed(7), top_p=0.9)
    b = ours.generate(prompt, 15, generator=torch.Generator().manual_seed(7), top_p=0.9)
    c = ours.generate(prompt, 15, generator=torch.Generator().manual_seed(8), top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a tiny top_p keeps only the most likely token: greedy again
    assert torch.equal(ours.generate(prompt, 15, top_p=1e-6), greedy)
    # eos: the row stops at the first end-of-text token, which is kept
    eos = greedy[0, 5].item()
    stopped = ours.generate(prompt, 15, temperature=0, eos_id=eos)
    assert stopped[0, -1].item() == eos and stopped.size(1) <= 6


def test_export_hf_round_trip_loads_in_transformers(tiny, tmp_path):
    hf, folder = tiny
    ours = load(folder)
    export_hf(ours, tmp_path)
    back = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 50))
    assert max_logit_diff(back, ours, idx) <= 1e-5
    assert max_logit_diff(hf, load(tmp_path), idx) <= 1e-5


def test_our_checkpoint_loads_and_compiled_prefix_is_stripped(tiny, tmp_path):
    ours = load(tiny[1])
    state = {"_orig_mod." + k: v for k, v in ours.state_dict().items()}
    torch.save({"model": state, "model_config": vars(ours.config)}, tmp_path / "ckpt.pt")
    idx = torch.randint(0, 50257, (1, 20))
    assert torch.equal(load(tmp_path / "ckpt.pt")(idx)[0], ours(idx)[0])


def test_mismatched_weights_are_named(tiny, tmp_path):
    hf, folder = tiny
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"says n_layer=3 but holds 2 blocks"):
        load(tmp_path)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a nanoFT \(or nanoGPT\) checkpoint"):
        load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="neither a GPT-2 name"):
        load("gpt3")


@pytest.mark.parametrize("config, why", [
    ({"n_layer": 2, "n_head": 0, "n_embd": 64}, "n_head=0 is not a size a GPT-2 can have"),
    ({"n_layer": 2, "n_head": 3, "n_embd": 64}, "n_embd=64 is not divisible by n_head=3"),
    ({"n_layer": "2", "n_head": 4, "n_embd": 64}, "n_layer='2' is not a size"),
    ({"n_layer": 2, "n_embd": 64}, "has no n_head"),
    ([1, 2, 3], "holds a JSON list"),
    ({"model_type": "llama", "n_layer": 2, "n_head": 4, "n_embd": 64}, "describes a 'llama' model"),
    ({"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 100}, "vocab_size=100 is smaller than GPT-2's tokenizer"),
])
def test_hostile_config_json_is_a_one_line_error(tiny, tmp_path, config, why):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((tiny[1] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=re.escape(why)) as e:
        load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_files_that_are_no_checkpoint_are_one_line_errors(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not a torch.save archive: File is not a zip file"):
        load(tmp_path / "empty.pt")

    class Payload:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": {}, "model_config": {}, "x": Payload()}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="torch says: .*arbitrary code execution") as e:
        load(tmp_path / "pickle.pt")
    assert "\n" not in str(e.value)
    gpt = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": gpt.state_dict(), "model_config": {**vars(gpt.config), "n_layer": "x"}}, tmp_path / "cfg.pt")
    with pytest.raises(ValueError, match="n_layer='x' is not a size"):
        load(tmp_path / "cfg.pt")
    torch.save({"model": gpt.state_dict(), "model_config": vars(gpt.config), "template": {"prompt": "{instruction}"}},
               tmp_path / "tpl.pt")
    with pytest.raises(ValueError, match="its prompt template is not usable"):
        load_gpt2.load_model(tmp_path / "tpl.pt")


def test_init_and_optimizer_groups():
    config = GPTConfig(n_layer=4, n_head=2, n_embd=32, vocab_size=100, block_size=16)
    torch.manual_seed(0)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / 8 ** 0.5) < 0.001  # 1/sqrt(2 * n_layer)
    decay, no_decay = model.optim_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ----------------------------------------------------------------------------- your own pretrained GPT-2: nanoGPT and llm.c

def nanogpt_state_dict(hf, vocab=50304, bias=True, compiled=False):
    """A nanoGPT model's state_dict written from a transformers GPT-2: 'transformer.' names, nn.Linear (out, in)
    weights, the vocabulary padded to 50,304 (as nanoGPT pads it), and mask buffers; with bias=False, no biases."""
    sd = {}
    for name, t in hf.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (not bias and name.endswith(".bias")):
            continue
        t = t.t().contiguous() if name.endswith(load_gpt2.CONV1D) else t.clone()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = torch.cat([t, torch.randn(vocab - t.size(0), t.size(1)) * 0.02])  # padding rows, never used
        sd[("_orig_mod." if compiled else "") + name] = t
    sd["lm_head.weight"] = sd[("_orig_mod." if compiled else "") + "transformer.wte.weight"]  # tied, as nanoGPT ties it
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):  # nanoGPT keeps its causal mask as a buffer when it has no flash attention
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    return sd


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)])
def test_a_nanogpt_checkpoint_loads_with_the_reference_logits(tmp_path, bias, compiled):
    hf = reference_model(seed=3)
    if not bias:  # the reference for nanoGPT's bias=False: the same model with every bias zero
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    c = hf.config
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, bias=bias,
                vocab_size=50304, dropout=0.0)
    torch.save({"model": nanogpt_state_dict(hf, bias=bias, compiled=compiled), "model_args": args, "iter_num": 5000,
                "best_val_loss": torch.tensor(2.9), "config": {"dataset": "openwebtext"}}, tmp_path / "ckpt.pt")
    ours = load(tmp_path / "ckpt.pt")
    idx = torch.randint(0, 50257, (2, 40))
    assert ours.config.bias is bias and ours.config.vocab_size == 50257
    assert max_logit_diff(hf, ours, idx) <= 1e-5
    export_hf(ours, tmp_path / "hf")  # a bias-free model exports with zero biases, which transformers reads
    assert max_logit_diff(hf, GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval(), idx) <= 1e-5


def write_llmc(hf, path, version=3):
    """An llm.c checkpoint written from a transformers GPT-2 the way llm.c's train_gpt2.py writes one."""
    c, sd = hf.config, hf.state_dict()
    L, C = c.n_layer, c.n_embd
    wte = sd["transformer.wte.weight"]
    Vp = (wte.size(0) + 127) // 128 * 128
    header = torch.zeros(256, dtype=torch.int32)
    header[:8] = torch.tensor([20240326, version, c.n_positions, wte.size(0), L, c.n_head, C, Vp])
    tensors = [torch.cat([wte, torch.zeros(Vp - wte.size(0), C)]), sd["transformer.wpe.weight"]]
    for name in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"):
        for i in range(L):
            t = sd[f"transformer.h.{i}.{name}"]
            tensors.append(t.t() if name.endswith("weight") and t.dim() == 2 else t)  # Conv1D (in, out) -> (out, in)
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(header.numpy().tobytes())
        for t in tensors:
            t = t.contiguous().float()
            f.write(t.numpy().tobytes() if version == 3 else t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def test_an_llmc_checkpoint_loads_with_the_reference_logits(tmp_path):
    hf = reference_model(seed=4)
    write_llmc(hf, tmp_path / "gpt2_tiny.bin")
    idx = torch.randint(0, 50257, (2, 40))
    assert max_logit_diff(hf, load(tmp_path / "gpt2_tiny.bin"), idx) <= 1e-5
    write_llmc(hf, tmp_path / "gpt2_tiny_bf16.bin", version=5)
    bf16 = load(tmp_path / "gpt2_tiny_bf16.bin")  # bf16 weights, as llm.c trains: equal to the rounded reference
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert max_logit_diff(hf, bf16, idx) <= 1e-5


def test_hostile_llmc_headers_are_refused(tmp_path):
    hf = reference_model(seed=4)
    write_llmc(hf, tmp_path / "good.bin")
    data = (tmp_path / "good.bin").read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4").copy()
    for change, why in (((0, 1234), "no header with magic number 20240326"), ((1, 4), "of version 4"),
                        ((4, 3), "calls for"), ((6, 10 ** 6), "calls for"), ((5, 3), "impossible sizes"),
                        ((7, 10), "impossible sizes")):
        bad = header.copy()
        bad[change[0]] = change[1]
        (tmp_path / "bad.bin").write_bytes(bad.tobytes() + data[1024:])
        with pytest.raises(ValueError, match=why):
            load(tmp_path / "bad.bin")
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="cut short"):
        load(tmp_path / "short.bin")


# ----------------------------------------------------------------------------- safetensors are hostile

def safetensors_bytes(header, data=b""):
    head = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
    return len(head).to_bytes(8, "little") + head + data


@pytest.mark.parametrize("content, why", [
    (b"\x01\x02", "only 2 bytes"),
    ((10 ** 12).to_bytes(8, "little") + b"{}", "header size"),
    (safetensors_bytes(b"not json"), "not JSON"),
    (safetensors_bytes([1, 2]), "not a JSON object"),
    (safetensors_bytes({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16)), "dtype"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, bytes(8)), "outside"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), "bytes for shape"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8)), "shape"),
    (safetensors_bytes({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "has dtype \\['F32'\\]"),
    (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "not JSON"),
])
def test_malformed_safetensors_are_rejected(tmp_path, content, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why):
        read_safetensors(path)


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "t": torch.randn(4, 3).t()}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    back = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    from safetensors.torch import load_file  # and the reference reader agrees
    assert all(torch.equal(load_file(tmp_path / "x.safetensors")[k], v) for k, v in tensors.items())


# ----------------------------------------------------------------------------- downloads from a fake hub

class Hub(http.server.ThreadingHTTPServer):
    """Serves files like huggingface.co: /{repo}/resolve/main/{file}, LFS files via a redirect that carries
    X-Linked-Etag (the sha256), Range requests, and scripted failures."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.requests = {}, []
        self.truncate_next = set()  # paths whose next GET sends half of the body and hangs up
        self.fail_next = {}  # path -> number of 503 answers still to give
        self.wrong_sha = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        hub, path = self.server, self.path
        hub.requests.append((path, self.headers.get("Range")))
        if path.startswith("/cdn/"):
            return self.send_file(path.removeprefix("/cdn"))
        if path not in hub.files:
            return self.send_error(404, "Entry not found")
        if path.endswith(".safetensors"):  # an LFS file: the hub redirects to its CDN
            sha = hashlib.sha256(hub.files[path]).hexdigest()
            self.send_response(302)
            self.send_header("Location", "/cdn" + path)
            self.send_header("X-Linked-Etag", f'"{"0" * 64 if hub.wrong_sha else sha}"')
            self.send_header("X-Linked-Size", str(len(hub.files[path])))
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_file(path)

    def send_file(self, path):
        hub, data = self.server, self.server.files[path]
        if hub.fail_next.get(path):
            hub.fail_next[path] -= 1
            return self.send_error(503, "Service Unavailable")
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in self.headers else 0
        if start >= len(data) and start:
            self.send_response(416, "Range Not Satisfiable")
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if path in hub.truncate_next:
            hub.truncate_next.discard(path)
            body = body[:len(body) // 2]
        self.wfile.write(body)


@pytest.fixture()
def hub(tiny, tmp_path, monkeypatch):
    """A hub on 127.0.0.1 that has the tiny model as openai-community/gpt2, and an empty cache."""
    server = Hub()
    for name in ("config.json", "model.safetensors"):
        server.files[f"/openai-community/gpt2/resolve/main/{name}"] = (tiny[1] / name).read_bytes()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NANOFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "BACKOFF", 0.01)
    yield server
    server.shutdown()
    server.server_close()


def test_download_from_hub_verifies_and_caches(hub, tiny, tmp_path):
    model = load("gpt2")
    cached = tmp_path / "cache" / "gpt2"
    assert (cached / "model.safetensors").read_bytes() == (tiny[1] / "model.safetensors").read_bytes()
    assert not list(cached.glob("*.part"))
    assert max_logit_diff(tiny[0], model, torch.randint(0, 50257, (1, 30))) <= 1e-5
    n = len(hub.requests)
    load("gpt2")  # second time: from the cache, no network
    assert len(hub.requests) == n


def test_truncated_download_is_resumed_and_verified(hub, tiny, tmp_path):
    path = "/openai-community/gpt2/resolve/main/model.safetensors"
    hub.truncate_next.add(path)
    hub.fail_next[path] = 1  # and one 503 on the way
    load("gpt2")
    ranges = [r for p, r in hub.requests if p == "/cdn" + path]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1] != "bytes=0-"
    got = (tmp_path / "cache" / "gpt2" / "model.safetensors").read_bytes()
    assert got == (tiny[1] / "model.safetensors").read_bytes()


def test_partial_file_from_an_interrupted_run_is_resumed(hub, tiny, tmp_path):
    data = (tiny[1] / "model.safetensors").read_bytes()
    part = tmp_path / "cache" / "gpt2" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    load("gpt2")
    assert ("/cdn/openai-community/gpt2/resolve/main/model.safetensors", "bytes=1000-") in hub.requests
    assert (tmp_path / "cache" / "gpt2" / "model.safetensors").read_bytes() == data


def test_sha256_mismatch_is_an_error_and_nothing_is_cached(hub, tmp_path):
    hub.wrong_sha = True
    with pytest.raises(DownloadError, match="corrupt: sha256"):
        load("gpt2")
    leftovers = [p.name for p in (tmp_path / "cache" / "gpt2").iterdir()]
    assert leftovers == ["config.json"]  # the small file is fine; no model file, no .part


def test_missing_model_is_a_clear_error(hub):
    del hub.files["/openai-community/gpt2/resolve/main/config.json"]
    with pytest.raises(DownloadError, match=r"could not get model 'gpt2'.*answered 404.*HF_ENDPOINT"):
        load("gpt2")


def test_offline_mode_uses_the_cache_only(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="not in the cache and HF_HUB_OFFLINE is set"):
        load("gpt2")
    assert hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    load("gpt2")
    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load("gpt2")
    assert len(hub.requests) == n


def test_cli_loads_and_reports_errors_in_one_line(hub):
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    ok = subprocess.run([sys.executable, "load_gpt2.py", "--model=gpt2", "--max_new_tokens=3", "--prompt=Hi"],
                        cwd=HERE, env=env, capture_output=True, text=True)
    if ok.returncode != 0 and "tiktoken" in ok.stderr:
        pytest.skip("tiktoken's GPT-2 files are not available offline: set TIKTOKEN_CACHE_DIR")
    assert ok.returncode == 0, ok.stderr
    assert "parameters:" in ok.stdout and "n_layer=2" in ok.stdout
    del hub.files["/openai-community/gpt2/resolve/main/config.json"]
    env["NANOFT_CACHE"] = env["NANOFT_CACHE"] + "-empty"
    bad = subprocess.run([sys.executable, "load_gpt2.py", "--model=gpt2"], cwd=HERE, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: could not get model 'gpt2'") and "404" in bad.stderr


@pytest.mark.skipif(not (load_gpt2.cache_dir() / "gpt2" / "model.safetensors").exists(),
                    reason="the real gpt2 weights are not in the cache (python load_gpt2.py --model=gpt2 fetches them)")
def test_real_gpt2_greedy_matches_transformers_integration_test():
    model = load("gpt2")
    out = model.generate(torch.tensor([[464, 3290]]), 18, temperature=0)
    assert out[0].tolist() == [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290,
                               2688, 27262, 13, 198, 198, 464, 3290]


# ----------------------------------------------------------------------------- downloads that can't hang, poison the cache or lie

class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Announces 1,000 bytes, then sends one byte every 0.2 s."""
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                threading.Event().wait(0.2)
        except OSError:  # the client gave up
            pass


@pytest.fixture()
def trickle(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.json"
    server.shutdown()
    server.server_close()


def test_a_trickling_download_gives_up_by_the_stall_rule_and_the_deadline(trickle, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "STALL_WINDOW", 1)
    monkeypatch.setattr(download, "RETRIES", 1)
    monkeypatch.setenv("NANOFT_DOWNLOAD_MIN_RATE", "100")  # bytes/s; the trickle gives 5
    with pytest.raises(DownloadError, match=r"fewer than 100 bytes/s for 1 s \(NANOFT_DOWNLOAD_MIN_RATE\)"):
        download.download(trickle, tmp_path / "a" / "slow.json")
    monkeypatch.setenv("NANOFT_DOWNLOAD_MIN_RATE", "0")
    monkeypatch.setenv("NANOFT_DOWNLOAD_DEADLINE", "1")
    with pytest.raises(DownloadError, match=r"ran past its deadline of 1 s \(NANOFT_DOWNLOAD_DEADLINE\)"):
        download.download(trickle, tmp_path / "b" / "slow.json")
    for folder in ("a", "b"):  # what came is kept to be resumed, but never as the file itself
        assert [p.name for p in (tmp_path / folder).iterdir()] == ["slow.json.part"]


def test_what_is_not_the_asked_for_file_is_never_cached(hub, tiny, tmp_path):
    config = "/openai-community/gpt2/resolve/main/config.json"
    cache = tmp_path / "cache"
    for body, why in ((b"<!DOCTYPE html><html><body>Rate limited</body></html>", "HTML page"),
                      (b'{"model_type": "gpt2", "n_layer": 2}', "has no n_head, n_embd"),
                      (b'{"n_layer": 2, "n_head": 3, "n_embd": 64}', "not divisible by n_head=3"),
                      (b"[" * 100_000 + b"]" * 100_000, "RecursionError")):
        hub.files[config] = body
        with pytest.raises(DownloadError, match=why):
            load("gpt2")
        assert not cache.exists()  # nothing cached, not even an empty folder
    hub.files[config] = (tiny[1] / "config.json").read_bytes()
    hub.files["/openai-community/gpt2/resolve/main/model.safetensors"] = safetensors_bytes(b'{"w": {"dtype": ["F32"]}}')
    with pytest.raises(DownloadError, match="tensor 'w' has dtype"):
        load("gpt2")
    assert sorted(p.name for p in (cache / "gpt2").iterdir()) == ["config.json"]  # the good file is kept


def test_a_bad_file_in_the_cache_is_named_with_what_to_do(hub):
    load("gpt2")
    cached = load_gpt2.cache_dir() / "gpt2" / "config.json"
    cached.write_text('{"n_layer": 2, "n_head": 0, "n_embd": 64}')
    with pytest.raises(ValueError, match=rf"n_head=0 is not a size.*delete {cached.parent} to download it again"):
        load("gpt2")


def test_a_part_file_longer_than_the_remote_file_starts_over(hub, tiny):
    folder = load_gpt2.cache_dir() / "gpt2"
    folder.mkdir(parents=True)
    real = (tiny[1] / "config.json").read_bytes()
    (folder / "config.json.part").write_bytes(real + b"left over from another file")
    load("gpt2")  # answered 416: the .part is not taken as complete
    assert (folder / "config.json").read_bytes() == real
    assert [r for n, r in hub.requests if n.endswith("config.json")] == [f"bytes={len(real) + 27}-", None]


def test_failed_weight_downloads_name_every_way_on(hub, monkeypatch):
    del hub.files["/openai-community/gpt2/resolve/main/config.json"]
    with pytest.raises(DownloadError) as e:
        load("gpt2")
    assert all(s in str(e.value) for s in ("HF_ENDPOINT", "--model=<folder>")) and "bytes already fetched" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as e:
        load("gpt2")
    assert all(s in str(e.value) for s in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "--model=<folder>"))
    assert not load_gpt2.cache_dir().exists()


def test_a_missing_tokenizer_offline_is_one_line_naming_tiktoken_cache_dir(tiny, tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}  # no files, and no network to fetch them
    result = subprocess.run([sys.executable, "sample.py", f"--model={tiny[1]}", "--prompt=Hi"], cwd=HERE, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "TIKTOKEN_CACHE_DIR" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- configurator

@pytest.fixture()
def settings():
    return {"model": "gpt2", "lr": 3e-4, "batch_size": 8, "compile": False, "top_k": None, "betas": (0.9, 0.95),
            "os": os}  # a module is not a setting


def run_configure(namespace, argv, capsys):
    with pytest.raises(SystemExit) as e:
        configure(namespace, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.err + captured.out


def test_configurator_parses_types(settings):
    config = configure(settings, ["--model=gpt2-medium", "--lr=1", "--batch_size=16", "--compile=true",
                                  "--top_k=50", "--betas=(0.9,0.99)"])
    assert config == {"model": "gpt2-medium", "lr": 1.0, "batch_size": 16, "compile": True, "top_k": 50,
                      "betas": (0.9, 0.99)}
    assert isinstance(settings["lr"], float) and "os" not in config
    for text, value in [("False", False), ("0", False), ("1", True), ("True", True)]:
        assert configure(settings, [f"--compile={text}"])["compile"] is value


def test_configurator_rejects_unknown_key_with_suggestion(settings, capsys):
    code, err = run_configure(settings, ["--batchsize=4"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "unknown config key 'batchsize' (did you mean 'batch_size'?)" in err


@pytest.mark.parametrize("arg, why", [("--batch_size=2.5", "batch_size takes a int"),
                                      ("--lr=fast", "lr takes a float"),
                                      ("--compile=maybe", "compile takes a bool"),
                                      ("--batch_size=True", "batch_size takes a int"),
                                      ("--lr", "has no value")])
def test_configurator_rejects_wrong_types(settings, capsys, arg, why):
    code, err = run_configure(settings, [arg], capsys)
    assert code == 2 and why in err


def test_configurator_applies_config_file_first(settings, tmp_path, capsys):
    (tmp_path / "cfg.py").write_text("lr = 1e-5\nbatch_size = 4\nmodel = 'gpt2-large'\n_private = 1\n")
    config = configure(settings, [str(tmp_path / "cfg.py"), "--batch_size=2"])
    assert config["lr"] == 1e-5 and config["batch_size"] == 2 and config["model"] == "gpt2-large"
    (tmp_path / "wrong.py").write_text("model = 2\n")
    code, err = run_configure(settings, [str(tmp_path / "wrong.py")], capsys)
    assert code == 2 and "model takes a str" in err
    (tmp_path / "bad.py").write_text("learning_rate = 1e-5\n")
    code, err = run_configure(settings, [str(tmp_path / "bad.py")], capsys)
    assert code == 2 and "unknown config key 'learning_rate'" in err
    code, err = run_configure(settings, ["nope.py"], capsys)
    assert code == 2 and "does not exist" in err


def test_configurator_help_lists_every_key(settings, capsys):
    code, out = run_configure(settings, ["--help"], capsys)
    assert code == 0
    for line in ["--model      = 'gpt2'", "--lr         = 0.0003", "--top_k      = None"]:
        assert line in out
    assert "--os" not in out


@pytest.mark.parametrize("script", ["finetune.py", "classify.py", "sample.py", "prepare.py", "load_gpt2.py", "bench.py"])
def test_help_explains_every_setting_with_its_default(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=HERE, capture_output=True, text=True).stdout
    settings = [line for line in out.splitlines() if line.startswith("  --")]
    assert len(settings) >= 3
    for line in settings:  # --key = default  # the comment at the setting's definition
        key, _, rest = line.strip().partition(" = ")
        default, _, comment = rest.partition("  # ")
        assert default and len(comment) > 8, line
    if script in ("finetune.py", "sample.py"):  # the settings named after builtins are given without the underscore
        assert any(line.startswith("  --compile ") for line in settings) and "--compile_" not in out


def test_a_setting_named_after_a_builtin_is_set_without_its_underscore():
    namespace = {"compile_": "auto", "input_": "", "lr": 1.0}
    config = configure(namespace, ["--compile=True", "--input=Bonjour"])
    assert config == {"compile": "True", "input": "Bonjour", "lr": 1.0} and namespace["compile_"] == "True"


def test_a_config_file_with_a_syntax_error_is_one_line(settings, tmp_path, capsys):
    (tmp_path / "broken.py").write_text("lr = (3e-5\n")
    code, err = run_configure(settings, [str(tmp_path / "broken.py")], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not valid Python" in err and "broken.py" in err


def test_model_py_alone_and_with_lora_py_works_when_copied(tmp_path):
    for name in ("model.py", "lora.py"):
        (tmp_path / name).write_bytes((HERE / name).read_bytes())
    code = ("import torch, model\n"
            "gpt = model.GPT(model.GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=16))\n"
            "print(gpt.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0).shape[1])\n")
    alone = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "..", capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert alone.returncode == 0 and alone.stdout == "8\n", alone.stderr
    lora = code + "import lora\nlora.add_lora(gpt, 4, 8)\nprint(sum(p.requires_grad for p in gpt.parameters()) > 0)\n"
    with_lora = subprocess.run([sys.executable, "-c", lora], cwd=tmp_path / "..", capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert with_lora.returncode == 0 and with_lora.stdout == "8\nTrue\n", with_lora.stderr


# ----------------------------------------------------------------------------- prepare.py

@pytest.fixture(scope="module")
def shared():
    folder = os.environ.get("NANOFT_SHARED_DATA")
    if not folder:
        pytest.skip("NANOFT_SHARED_DATA is not set: it names the folder of the real dataset files (../shared/data)")
    if not Path(folder).is_dir():
        pytest.skip(f"NANOFT_SHARED_DATA={folder} is not a folder")
    return Path(folder).resolve()  # CI gives a relative path; the CLI test runs in another cwd


@pytest.fixture(scope="module")
def enc():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, with no TIKTOKEN_CACHE_DIR
        pytest.skip(f"tiktoken's GPT-2 files are not available ({e.__class__.__name__}): set TIKTOKEN_CACHE_DIR")


@pytest.fixture(scope="module", autouse=True)
def quick_local_downloads():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(download, "BACKOFF", 0.01)
        mp.delenv("HF_HUB_OFFLINE", raising=False)  # it would stop load_gpt2.download before it starts
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy set in the environment must not get these
        yield


@pytest.fixture(scope="module")
def server():
    """serve(path, name=None, truncate=False) -> the URL of path on a 127.0.0.1 server (the Hub above);
    serve.requests lists every (/name, Range header) asked for."""
    hub = Hub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()

    def serve(path, name=None, truncate=False):
        name = name or Path(path).name
        hub.files["/" + name] = Path(path).read_bytes()
        if truncate:
            hub.truncate_next.add("/" + name)
        return f"{hub.url}/{name}"
    serve.requests = hub.requests
    yield serve
    hub.shutdown()
    hub.server_close()


def asked_for(server, name):
    return [rng for n, rng in server.requests if n == "/" + name]


def split_examples(folder, split):
    """The token lists of a prepared split, with its prompt lengths or labels."""
    arrays = load_split(folder, split)
    offsets = arrays["offsets"]
    tokens = [arrays["tokens"][offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    return tokens, arrays.get("prompt_len", arrays.get("labels"))


def meta_of(folder):
    return json.loads((Path(folder) / "meta.json").read_text())


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_instructions(path, n=200, seed=0):
    """n Alpaca-format records of four kinds (with and without an input), of varied lengths: small data a tiny
    model can learn from, written by the test so that training tests run anywhere."""
    rng = np.random.default_rng(seed)
    words = ["apple", "river", "stone", "cloud", "lamp", "tiger", "bread", "music", "green", "paper"]
    records = []
    for i in range(n):
        a, b, k = (int(x) for x in rng.integers(1, 99, 3))
        items = [str(w) for w in rng.choice(words, size=int(rng.integers(2, 7)))]
        records.append([
            {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} plus {b} is {a + b}."},
            {"instruction": f"Repeat the word '{items[0]}' {k % 9 + 1} times.", "input": "",
             "output": " ".join([items[0]] * (k % 9 + 1))},
            {"instruction": "Reverse the list.", "input": ", ".join(items), "output": ", ".join(items[::-1])},
            {"instruction": f"Name something {items[1]}-like.", "input": "", "output": f"A {items[1]} is like a {items[-1]}."},
        ][i % 4])
    return write_json(path, records)


def write_messages(path, n=300, seed=0):
    """A label,text CSV of n messages, spam and ham, written by the test (the SMS corpus's shape, not its text)."""
    rng = np.random.default_rng(seed)
    spam = ["WINNER!! You have won a {} prize, call {} now", "URGENT: claim your free {} today, text {} to 8{}",
            "Free entry in a weekly {} draw, reply {} to win"]
    ham = ["Are we still on for {} at {}?", "Sorry, I'll call you later about the {}", "Can you pick up {} on the way {}"]
    fill = ["lunch", "the game", "bread", "mum", "tonight", "the car", "1000", "cash", "home"]
    rows = []
    for i in range(n):
        label, forms = ("spam", spam) if i % 2 else ("ham", ham)
        text = forms[int(rng.integers(len(forms)))].format(*rng.choice(fill, size=3))
        rows.append(f'{label},"{text}"')
    path.write_text("label,text\n" + "\n".join(rows) + "\n")
    return path


# ----------------------------------------------------------------------------- the prompt template

def test_format_prompt_is_the_ch07_alpaca_template():
    head = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n")
    assert format_prompt("Name a color.") == head + "Name a color.\n\n### Response:\n"
    assert format_prompt("Translate.", "Hola") == head + "Translate.\n\n### Input:\nHola\n\n### Response:\n"
    assert format_prompt("Translate.", "") == format_prompt("Translate.")
    assert json.loads(json.dumps(ALPACA_TEMPLATE)) == ALPACA_TEMPLATE  # goes into meta.json and checkpoints


# ----------------------------------------------------------------------------- instruction-data (1,100)

@pytest.fixture(scope="module")
def instruction_data(shared, server, tmp_path_factory):
    url = server(shared / "instruction-data.json")
    folder = prepare("instruction-data", tmp_path_factory.mktemp("data"), urls={"instruction-data": url})
    return folder, url


def test_instruction_data_is_split_935_55_110(instruction_data, shared):
    folder, url = instruction_data
    meta = meta_of(folder)
    assert meta["splits"] == {"train": 935, "val": 55, "test": 110}
    assert meta["kind"] == "instruction" and meta["source"] == url and meta["seed"] == 1337
    assert meta["counts"]["read"] == meta["counts"]["examples"] == 1100 and meta["skipped"] == {}
    assert meta["sha256"] == pp.sha256_of(shared / "instruction-data.json")
    assert meta["template"] == ALPACA_TEMPLATE
    assert set(meta["tokens"]) >= {"max", "mean", "p95"} and meta["tokens"]["max"] <= 1024
    assert (folder / "download" / "instruction-data.json").read_bytes() == (shared / "instruction-data.json").read_bytes()


def test_every_record_lands_in_exactly_one_split(instruction_data, shared):
    folder, _ = instruction_data
    original = json.loads((shared / "instruction-data.json").read_text())
    prepared = [r for split in ("train", "val", "test") for r in load_records(folder, split)]
    assert sorted(json.dumps(r, sort_keys=True) for r in prepared) == \
        sorted(json.dumps(r, sort_keys=True) for r in original)


def test_instruction_examples_are_prompt_then_response_then_endoftext(instruction_data, enc):
    folder, _ = instruction_data
    for split in ("train", "val", "test"):
        tokens, prompt_lens = split_examples(folder, split)
        for ids, prompt_len, record in zip(tokens, prompt_lens, load_records(folder, split)):
            prompt = format_prompt(record["instruction"], record["input"])
            assert ids[:prompt_len] == enc.encode_ordinary(prompt)
            assert ids[prompt_len:-1] == enc.encode_ordinary(record["output"])
            assert ids[-1] == EOT and EOT not in ids[:-1]
            assert enc.decode(ids) == prompt + record["output"] + "<|endoftext|>"


def test_split_arrays_are_memory_mapped_with_compact_dtypes(instruction_data):
    folder, _ = instruction_data
    arrays = load_split(folder, "train")
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    assert arrays["tokens"].dtype == np.uint16 and arrays["offsets"].dtype == np.int64
    assert arrays["prompt_len"].dtype == np.int32 and len(arrays["offsets"]) == 935 + 1
    assert arrays["offsets"][-1] == len(arrays["tokens"])
    with pytest.raises(ValueError, match="no 'dev' split"):
        load_split(folder, "dev")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_split(folder.parent, "train")


def test_prepared_dataset_is_reused_without_network(instruction_data, server, capsys):
    folder, url = instruction_data
    before = len(server.requests)
    assert prepare("instruction-data", folder.parent, urls={"instruction-data": url}) == folder
    assert prepare("instruction-data", folder.parent, seed=7, urls={"instruction-data": url}) == folder
    assert len(server.requests) == before
    assert "prepared with seed=1337 (not 7)" in capsys.readouterr().err


def test_alpaca_200_parses(shared, tmp_path):
    folder = prepare("alpaca", tmp_path, urls={"alpaca": str(shared / "alpaca_200.json")})
    meta = meta_of(folder)
    assert meta["counts"]["read"] == 200 and meta["skipped"] == {}
    assert meta["splits"] == {"train": 170, "val": 10, "test": 20}
    assert not list(folder.glob("*.json*.part")) and meta["source"] == str(shared / "alpaca_200.json")


# ----------------------------------------------------------------------------- spam

@pytest.fixture(scope="module")
def spam(shared, server, tmp_path_factory):
    url = server(shared / "sms_spam_collection.zip", name="sms+spam+collection.zip", truncate=True)
    pp.KNOWN_SHA256[url] = pp.KNOWN_SHA256[pp.spam_url]  # as for the real URL: a part is resumed only if verifiable
    folder = prepare("spam", tmp_path_factory.mktemp("data"), urls={"spam": url})
    return folder


def test_truncated_dataset_download_is_resumed_and_verified(spam, server, shared):
    first, second = asked_for(server, "sms+spam+collection.zip")  # the first answer broke off halfway
    size = (shared / "sms_spam_collection.zip").stat().st_size
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= size // 2  # resumed
    kept = spam / "download" / "sms-spam-collection.zip"  # the URL's file name, made a safe one
    assert kept.read_bytes() == (shared / "sms_spam_collection.zip").read_bytes()
    assert meta_of(spam)["sha256"] == pp.KNOWN_SHA256[pp.spam_url]  # the real UCI file


def test_spam_splits_are_balanced_and_seeded(spam):
    meta = meta_of(spam)
    assert meta["kind"] == "classification" and meta["labels"] == ["ham", "spam"]
    assert meta["counts"]["read"] == 5574  # no line swallowed by a quote at the start of a message
    assert meta["counts"]["per_label"] == {"ham": 4827, "spam": 747} and meta["counts"]["balanced"] == 1494
    assert meta["splits"] == {"train": 1045, "val": 149, "test": 300}
    labels = np.concatenate([load_split(spam, s)["labels"] for s in ("train", "val", "test")])
    assert np.bincount(labels).tolist() == [747, 747]
    records = [r for s in ("train", "val", "test") for r in load_records(spam, s)]
    assert sum(r["label"] == "spam" for r in records) == 747
    assert any(r["text"].startswith('"') for r in records) and all("\n" not in r["text"] for r in records)


def test_spam_same_seed_same_output_other_seed_differs(spam, shared, tmp_path):
    local = {"spam": str(shared / "sms_spam_collection.zip")}
    again = prepare("spam", tmp_path / "again", urls=local)
    other = prepare("spam", tmp_path / "other", seed=7, urls=local)
    for key in ("tokens", "offsets", "labels"):
        assert np.array_equal(load_split(spam, "train")[key], load_split(again, "train")[key])
    assert not np.array_equal(load_split(spam, "train")["tokens"], load_split(other, "train")["tokens"])
    assert meta_of(other)["splits"] == meta_of(spam)["splits"]


def test_wrong_checksum_of_a_known_file_is_refused(shared, server, tmp_path, monkeypatch):
    url = server(shared / "sms_spam_collection.zip", name="checked.zip")
    monkeypatch.setitem(pp.KNOWN_SHA256, url, "0" * 64)
    with pytest.raises(DownloadError, match="corrupt"):
        prepare("spam", tmp_path, urls={"spam": url})
    assert not (tmp_path / "spam" / "meta.json").exists()


# ----------------------------------------------------------------------------- medquad

@pytest.fixture(scope="module")
def medquad(shared, server, tmp_path_factory):
    url = server(shared / "MedQuAD-master.zip", name="master.zip")
    return prepare("medquad", tmp_path_factory.mktemp("data"), urls={"medquad": url})


def test_medquad_counts_are_reported(medquad):
    meta = meta_of(medquad)
    counts, skipped = meta["counts"], meta["skipped"]
    assert counts["xml_files"] == 11274 and counts["pairs"] == 47441
    assert counts["non_empty"] == 16407  # answers removed upstream for copyright leave 16,407 of 47,441
    assert skipped["empty answer"] == 47441 - 16407
    assert counts["duplicates"] == skipped["duplicate"] == 48
    too_long = skipped.get("longer than max_length=1024", 0)
    assert counts["examples"] == 16407 - 48 - too_long == sum(meta["splits"].values())
    assert "unsafe member name" not in skipped and "XML declares a DTD (refused)" not in skipped


def test_medquad_records_are_clean_alpaca_and_unique(medquad):
    records = load_records(medquad, "train")
    assert all(r["input"] == "" and r["instruction"] and r["output"] for r in records)
    assert all("  " not in r["output"] and r["output"] == r["output"].strip() for r in records)
    assert len({(r["instruction"], r["output"]) for r in records}) == len(records)


def test_medquad_kaggle_csv_is_accepted(tmp_path):
    csv_file = tmp_path / "medquad.csv"
    csv_file.write_text('question,answer,source,focus_area\n'
                        '"What is A?","A is\n  a thing,  with commas.",GARD,A\n'
                        'What is B?,,GARD,B\n'
                        '"What is A?","A is a thing,  with commas.",GARD,A\n'
                        'What is C?,C is rare.,NIDDK,C\n')
    meta = meta_of(prepare("medquad", tmp_path / "data", urls={"medquad": str(csv_file)}))
    assert meta["counts"]["pairs"] == 4 and meta["counts"]["non_empty"] == 3
    assert meta["counts"]["duplicates"] == 0 and meta["counts"]["examples"] == 3  # a line break is kept
    assert meta["skipped"] == {"empty answer": 1}


def qa_xml(question, answer, doctype=""):
    return (f'<?xml version="1.0" encoding="UTF-8"?>{doctype}<Document><QAPairs><QAPair pid="1">'
            f'<Question qid="1">{question}</Question><Answer>{answer}</Answer></QAPair></QAPairs></Document>')


def test_medquad_zip_refuses_unsafe_members_and_dtds(tmp_path):
    bomb = '<!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("MedQuAD-master/1_A/ok.xml", qa_xml("What is safe?", "Safe  is\n\n fine."))
        z.writestr("../evil.xml", qa_xml("Evil?", "Escaped."))
        z.writestr("/abs.xml", qa_xml("Absolute?", "Escaped."))
        z.writestr("MedQuAD-master/../../evil2.xml", qa_xml("Evil too?", "Escaped."))
        z.writestr("MedQuAD-master/2_B/bomb.xml", qa_xml("Bomb?", "&b;", doctype=bomb))
    folder = prepare("medquad", tmp_path / "data", urls={"medquad": str(archive)})
    meta = meta_of(folder)
    assert meta["skipped"] == {"unsafe member name": 3, "XML declares a DTD (refused)": 1}
    assert meta["counts"]["pairs"] == 1
    records = [r for s in ("train", "val", "test") for r in load_records(folder, s)]
    assert records == [{"instruction": "What is safe?", "input": "", "output": "Safe is\nfine."}]
    assert not list(tmp_path.rglob("*.xml")) and not (tmp_path.parent / "evil.xml").exists()  # none extracted


def test_oversized_zip_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_MEMBER_BYTES", 1000)
    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("MedQuAD-master/big.xml", qa_xml("Big?", "x" * 100_000))  # deflates to far under 1000
    with pytest.raises(ValueError, match="no valid record .*member larger than 1,000 bytes"):
        prepare("medquad", tmp_path / "data", urls={"medquad": str(archive)})


def test_a_file_that_is_not_a_zip_is_a_clear_error(tmp_path):
    archive = tmp_path / "master.zip"
    archive.write_bytes(b"PK\x03\x04 this is only the start of a zip")
    with pytest.raises(ValueError, match="not a readable zip file"):
        prepare("medquad", tmp_path / "data", urls={"medquad": str(archive)})


# ----------------------------------------------------------------------------- files of your own

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def test_malformed_json_records_are_skipped_and_counted(tmp_path, capsys):
    records = [GOOD, {**GOOD, "input": "to Bob"}, GOOD, "a string", {"instruction": "No output."},
               {**GOOD, "input": 3}, {**GOOD, "output": "  "}, {**GOOD, "output": "\ud800"}]
    for n in range(5):
        records.append({"instruction": f"Missing output {n}"})
    folder = prepare(str(write_json(tmp_path / "mine.json", records)), tmp_path / "data")
    meta = meta_of(folder)
    assert meta["counts"]["read"] == 13 and meta["counts"]["examples"] == 3
    assert meta["skipped"] == {"not a JSON object": 1, "no instruction or no output": 6,
                               "a field is not a string": 1, "empty instruction or output": 1,
                               "lone surrogate": 1}
    out = capsys.readouterr().out
    assert out.count("skipped (no instruction or no output)") == 3  # the first few shown, not all six
    assert "Missing output 1" in out and "Missing output 4" not in out


def test_malformed_jsonl_lines_are_skipped_and_counted(tmp_path, server):
    lines = [json.dumps(GOOD), "{not json", "", json.dumps({**GOOD, "instruction": "Say bye."}), '{"a": 1']
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
    url = server(tmp_path / "mine.jsonl", name="own/mine.jsonl")
    folder = prepare(url, tmp_path / "data")  # a URL of your own: NAME is the file's stem
    meta = meta_of(folder)
    assert folder == tmp_path / "data" / "mine" and (folder / "download" / "mine.jsonl").exists() and meta["source"] == url
    assert meta["counts"]["read"] == 4 and meta["counts"]["examples"] == 2
    assert meta["skipped"] == {"not JSON": 2}
    assert sum(len(load_records(folder, s)) for s in ("train", "val", "test")) == 2  # val gets the one left


def test_files_with_nothing_usable_are_clear_errors(tmp_path):
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="empty"):
        prepare(str(tmp_path / "empty.json"), tmp_path / "data")
    with pytest.raises(ValueError, match="no valid record"):
        prepare(str(write_json(tmp_path / "bad.json", [{"instruction": "x"}, 5])), tmp_path / "data")
    (tmp_path / "broken.json").write_text('[{"instruction": "x", "output": "y"')
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare(str(tmp_path / "broken.json"), tmp_path / "data")
    with pytest.raises(ValueError, match="not a list"):
        prepare(str(write_json(tmp_path / "object.json", GOOD)), tmp_path / "data")
    assert not list((tmp_path / "data").glob("*/meta.json"))


def test_unknown_dataset_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'shakespeare'.*alpaca, instruction-data"):
        prepare("shakespeare", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(str(tmp_path / "nowhere.jsonl"), tmp_path)
    with pytest.raises(ValueError, match="built-in dataset 'spam'"):
        prepare(str(tmp_path / "spam.csv"), tmp_path)


def test_literal_endoftext_in_data_stays_plain_text(tmp_path):
    record = {"instruction": "Quote <|endoftext|>.", "input": "", "output": "It is <|endoftext|>."}
    folder = prepare(str(write_json(tmp_path / "special.json", [record] * 10)), tmp_path / "data")
    for split in ("train", "val", "test"):
        for ids in split_examples(folder, split)[0]:
            assert ids.count(EOT) == 1 and ids[-1] == EOT


def test_long_examples_are_dropped_or_truncated(tmp_path):
    long_output = {"instruction": "Count.", "input": "", "output": " one" * 100}
    long_prompt = {"instruction": "Count" + " to ten" * 100, "input": "", "output": "No."}
    path = write_json(tmp_path / "long.json", [GOOD] * 9 + [long_output, long_prompt])
    dropped = meta_of(prepare(str(path), tmp_path / "dropped", max_length=64))
    assert dropped["skipped"] == {"longer than max_length=64": 2} and dropped["counts"]["examples"] == 9
    cut = prepare(str(path), tmp_path / "cut", max_length=64, truncate=True)
    meta = meta_of(cut)
    assert meta["skipped"] == {"longer than max_length=64": 1}  # cut inside its prompt: nothing left to learn
    assert meta["counts"]["truncated"] == 1 and meta["tokens"]["max"] == 64
    lengths = [len(ids) for s in ("train", "val", "test") for ids in split_examples(cut, s)[0]]
    assert sorted(lengths)[-1] == 64 and len(lengths) == 10


def test_classification_csv_and_tsv_of_your_own(tmp_path):
    (tmp_path / "reviews.csv").write_text('Label,Text\npos,"Great, really great."\nneg,"Bad\nvery bad"\n'
                                          'neg,Meh\nbroken row\npos,\n')
    meta = meta_of(prepare(str(tmp_path / "reviews.csv"), tmp_path / "data"))
    assert meta["labels"] == ["neg", "pos"] and meta["counts"]["read"] == 5 and meta["counts"]["examples"] == 3
    assert meta["skipped"] == {"not 2 columns": 1, "empty label or text": 1}
    (tmp_path / "moods.tsv").write_text("label\ttext\nhappy\t\"Yay\tyay\nsad\tOh no\n")
    folder = prepare(str(tmp_path / "moods.tsv"), tmp_path / "data")
    records = [r for s in ("train", "val", "test") for r in load_records(folder, s)]
    assert sorted(r["text"] for r in records) == ['"Yay\tyay', "Oh no"]  # extra tabs stay in the text


# ----------------------------------------------------------------------------- nothing outside its folder, nothing stale

def test_a_dataset_named_by_dots_or_odd_characters_stays_inside_data_dir(tmp_path):
    (tmp_path / "meta.json").write_text("the user's own file")
    (tmp_path / "in").mkdir()
    write_instructions(tmp_path / "in" / "...json", n=20)
    write_instructions(tmp_path / "in" / "my data (v2)!.json", n=20)
    data = tmp_path / "in" / "data"
    assert prepare(str(tmp_path / "in" / "...json"), data) == data / "dataset"  # the stem '..' is no folder name
    assert prepare(str(tmp_path / "in" / "my data (v2)!.json"), data) == data / "my-data-v2"
    assert (tmp_path / "meta.json").read_text() == "the user's own file"
    assert sorted(p.name for p in data.iterdir()) == ["dataset", "my-data-v2"]


def test_a_downloaded_file_named_like_an_output_never_replaces_it(server, tmp_path):
    url = server(write_instructions(tmp_path / "meta.json", n=20), name="odd/meta.json")  # a URL's file named meta.json
    folder = prepare(url, tmp_path / "data")
    assert folder.name == "meta" and meta_of(folder)["kind"] == "instruction"  # the prepared meta.json is intact
    assert (folder / "download" / "meta.json").read_bytes() == (tmp_path / "meta.json").read_bytes()


def test_a_dataset_file_that_changed_is_prepared_again(tmp_path, capsys):
    path = write_instructions(tmp_path / "mine.json", n=30)
    assert meta_of(prepare(str(path), tmp_path / "data"))["counts"]["examples"] == 30
    write_instructions(path, n=60, seed=1)
    assert meta_of(prepare(str(path), tmp_path / "data"))["counts"]["examples"] == 60
    assert "an earlier version of mine.json (its contents changed since): preparing it again" in capsys.readouterr().err
    os.utime(path, ns=(0, 0))  # touched, not changed: nothing to do
    prepare(str(path), tmp_path / "data")
    assert "preparing it again" not in capsys.readouterr().err
    assert meta_of(prepare(str(path), tmp_path / "data", seed=7))["seed"] == 7  # other settings: prepared again


def test_a_zip_bomb_is_refused_before_it_inflates(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:  # 15 MB of SMS lines in ~30 KB
        z.writestr("SMSSpamCollection", b"ham\tok see you\n" * 1_000_000)
    result = subprocess.run([sys.executable, "prepare.py", "--dataset=spam", f"--spam_url={tmp_path / 'bomb.zip'}",
                             f"--data_dir={tmp_path / 'data'}"], cwd=HERE, capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: __import__("resource").setrlimit(  # 1 GB of address space at most
                                __import__("resource").RLIMIT_AS, (1 << 30, 1 << 30)))
    assert "compressed more than 100:1" in result.stdout and result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_too_many_records_are_refused_while_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORDS", 50)
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps(GOOD) for _ in range(51)))
    with pytest.raises(ValueError, match="has more than 50 records: split it"):
        prepare(str(path), tmp_path / "data")
    (tmp_path / "table.csv").write_text("label,text\n" + "a,b\n" * 51)
    with pytest.raises(ValueError, match="has more than 50 records"):
        prepare(str(tmp_path / "table.csv"), tmp_path / "data")


def test_deeply_nested_json_is_a_clear_error_or_a_skipped_line(tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="is not valid JSON \\(RecursionError"):
        prepare(str(tmp_path / "deep.json"), tmp_path / "data")
    (tmp_path / "deep.jsonl").write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    meta = meta_of(prepare(str(tmp_path / "deep.jsonl"), tmp_path / "data"))
    assert meta["skipped"] == {"not JSON": 1} and meta["counts"]["examples"] == 1


# ----------------------------------------------------------------------------- never half a dataset

def test_interrupted_prepare_leaves_no_half_dataset(server, tmp_path, monkeypatch):
    url = server(write_instructions(tmp_path / "instruction-data.json", n=100), name="interrupted/instruction-data.json")
    write_split, calls = pp.write_split, []

    def crash_on_second_split(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_split(*args)
    monkeypatch.setattr(pp, "write_split", crash_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        prepare("instruction-data", tmp_path, urls={"instruction-data": url})
    folder = tmp_path / "instruction-data"
    assert sorted(p.name for p in folder.iterdir()) == ["download"]  # the raw download only
    assert sorted(p.name for p in (folder / "download").iterdir()) == ["instruction-data.json",
                                                                       "instruction-data.json.url"]  # and its URL
    monkeypatch.setattr(pp, "write_split", write_split)
    prepare("instruction-data", tmp_path, urls={"instruction-data": url})
    assert meta_of(folder)["splits"] == {"train": 85, "val": 5, "test": 10}
    assert len(asked_for(server, "interrupted/instruction-data.json")) == 1  # downloaded once


# ----------------------------------------------------------------------------- the command line

def test_command_line_prepares_and_reports_errors_for_people(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "prepare.py", *args, f"--data_dir={tmp_path}"], cwd=HERE,
                              capture_output=True, text=True, timeout=120)
    data = write_instructions(tmp_path / "instructions.json", n=100)
    ok = run("--dataset=instruction-data", f"--instruction_data_url={data}")
    assert ok.returncode == 0, ok.stderr
    assert "train 85, val 5, test 10" in ok.stdout and "examples/s" in ok.stdout
    bad = run(f"--dataset={tmp_path / 'missing.json'}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "missing.json does not exist" in bad.stderr


# ----------------------------------------------------------------------------- finetune.py




def test_collate_pads_with_eot_keeps_first_eot_and_masks_prompt():
    examples = [([1, 2, 3, 4, 50256], 3), ([5, 6, 50256], 2)]
    x, y = collate(examples)
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 50256, 50256]]
    assert y.tolist() == [[2, 3, 4, 50256], [6, 50256, IGNORE, IGNORE]]
    x, y = collate(examples, mask_prompt=True)
    assert y.tolist() == [[IGNORE, IGNORE, 4, 50256], [IGNORE, 50256, IGNORE, IGNORE]]


def test_length_grouping_covers_every_example_once_and_pads_less():
    lengths = np.random.default_rng(0).integers(20, 300, size=1000)
    batches = length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, 8, seed=1, epoch=1)
    shuffled = np.array_split(np.random.default_rng(1).permutation(1000), 125)
    assert padding_fraction(batches, lengths) < 0.05 < 0.3 < padding_fraction(shuffled, lengths)


def test_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"iter_num": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_atomic({"iter_num": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iter_num": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left


def test_written_files_get_the_permissions_a_plain_write_gives(tmp_path):
    """Temp file + rename must not leave checkpoints and exports owner-only (mkstemp's 0600): a server or
    another user reading them (ollama, a shared models folder) would be refused."""
    (tmp_path / "plain").write_bytes(b"x")
    save_atomic({"iter_num": 1}, tmp_path / "ckpt.pt")
    export_hf(GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16)), tmp_path / "hf")
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    for path in (tmp_path / "ckpt.pt", tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"):
        assert path.stat().st_mode & 0o777 == mode, path


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """A folder with a tiny GPT-2 (vocab 50257, context 256) and an Alpaca-format file the test wrote, and a
    function that runs finetune.py there."""
    root = tmp_path_factory.mktemp("finetune")
    reference_model(n_positions=256).save_pretrained(root / "tiny")
    write_instructions(root / "instructions.json")

    def cmd(*args, launcher=(sys.executable,)):
        return [*launcher, str(HERE / "finetune.py"), f"--model={root / 'tiny'}", f"--dataset={root / 'instructions.json'}",
                "--test_responses=False", "--eval_prompts=1", "--max_new_tokens=8", "--log_interval=1",
                "--eval_iters=2", *args]

    def run(*args, launcher=(sys.executable,), check=True, **kwargs):
        result = subprocess.run(cmd(*args, launcher=launcher), cwd=root, capture_output=True, text=True, timeout=300,
                                **kwargs)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result
    run.root, run.cmd = root, cmd
    return run


def logged(path, key="loss"):
    return {r["iter"]: r[key] for r in read_log(path) if key in r}


def test_finetune_loss_decreases_on_instructions(finetune_run):
    finetune_run("--max_iters=40", "--eval_interval=40", "--lr=2e-3", "--out_dir=out/learn", "--test_responses=True",
                 "--max_new_tokens=4")
    out = finetune_run.root / "out" / "learn"
    losses = logged(out / "log.jsonl")
    assert np.mean([losses[i] for i in range(36, 41)]) < np.mean([losses[i] for i in range(1, 6)]) - 1.0
    assert logged(out / "log.jsonl", "val_loss")[40] < losses[1]
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 20 and set(responses[0]) == {"instruction", "input", "output", "model_response"}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 40 and "### Response:" in ckpt["template"]["prompt"]
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert load(out / "best.pt").config.block_size == 256


def test_finetune_sigint_saves_and_resume_continues_exactly(finetune_run):
    common = ["--max_iters=8", "--eval_interval=4", "--dtype=float32", "--dropout=0.1", "--lr=1e-3"]
    finetune_run(*common, "--out_dir=out/straight")
    status, rest = interrupted_at("iter 2/8", finetune_run.cmd(*common, "--eval_prompts=0", "--out_dir=out/stopped"),
                                  finetune_run.root)
    assert status == 130 and "continue with --resume=True" in rest
    stopped_at = torch.load(finetune_run.root / "out/stopped/ckpt.pt", weights_only=True)["iter_num"]
    assert 2 <= stopped_at < 8
    alone = subprocess.run([sys.executable, str(HERE / "finetune.py"), "--resume=True", "--out_dir=out/stopped"],
                           cwd=finetune_run.root, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr  # everything else (model, data, lr, max_iters) from the checkpoint
    straight = logged(finetune_run.root / "out/straight/log.jsonl")
    resumed = logged(finetune_run.root / "out/stopped/log.jsonl")
    assert list(resumed) == list(range(1, 9)) and resumed == straight  # bit for bit on CPU fp32
    assert logged(finetune_run.root / "out/stopped/log.jsonl", "lr") == logged(finetune_run.root / "out/straight/log.jsonl", "lr")


def test_ddp_on_two_processes_equals_one_process(finetune_run):
    common = ["--max_iters=3", "--eval_interval=3", "--dtype=float32", "--batch_size=4", "--eval_prompts=0"]
    finetune_run(*common, "--grad_accum=2", "--out_dir=out/one")
    finetune_run(*common, "--grad_accum=1", "--out_dir=out/two",
                 launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"))
    one, two = (logged(finetune_run.root / f"out/{d}/log.jsonl") for d in ("one", "two"))
    assert list(one) == list(two) == [1, 2, 3]
    assert all(abs(one[i] - two[i]) < 1e-5 for i in one)
    val_one, val_two = (logged(finetune_run.root / f"out/{d}/log.jsonl", "val_loss")[3] for d in ("one", "two"))
    assert abs(val_one - val_two) < 1e-5


def test_finetune_nan_loss_stops_with_a_message(finetune_run):
    result = finetune_run("--max_iters=5", "--lr=1e30", "--out_dir=out/nan", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the loss became nan at iteration" in result.stderr and "lower lr" in result.stderr
    assert not (finetune_run.root / "out/nan/ckpt.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--batch_size=0"], "batch_size=0 must be at least 1"),
    (["--lr=-1"], "lr=-1.0 must not be negative"),
    (["--learning_rate=1"], "unknown config key 'learning_rate'"),
    (["--dataset=/nonexistent/data.json"], "/nonexistent/data.json"),
    (["--resume=True", "--out_dir=out/none"], "no checkpoint at out/none/ckpt.pt"),
    (["--lora_rank=-1"], "lora_rank=-1 must be 0 (off) or a rank of at least 1"),
    (["--lora_rank=4", "--lora_targets=q,attn.c_attn"], "choose one"),
    (["--lora_rank=4", "--lora_targets=query"], "unknown LoRA target(s) query"),
    (["--lora_rank=4", "--lora_alpha=0"], "lora_alpha=0.0 must be positive"),
    (["--device=tpu"], "device='tpu' is not one this project runs on"),
    pytest.param(["--device=cuda"], "device='cuda' but torch finds no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--seed=-1"], "seed=-1 must be a whole number from 0"),
    (["--beta1=1.0"], "beta1=1.0 must be in [0, 1)"),
    (["--resume=True", "--overwrite=True"], "resume=True and overwrite=True contradict each other"),
])
def test_finetune_rejects_bad_settings_in_one_line(finetune_run, args, message):
    result = finetune_run(*args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr


# ----------------------------------------------------------------------------- plain text at any scale

DECLARATION = (  # public domain: the United States Declaration of Independence, 1776 (its opening)
    "When in the Course of human events, it becomes necessary for one people to dissolve the political bands which "
    "have connected them with another, and to assume among the powers of the earth, the separate and equal station "
    "to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind "
    "requires that they should declare the causes which impel them to the separation.\n\n"
    "We hold these truths to be self-evident, that all men are created equal, that they are endowed by their "
    "Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness.--That "
    "to secure these rights, Governments are instituted among Men, deriving their just powers from the consent of "
    "the governed, --That whenever any Form of Government becomes destructive of these ends, it is the Right of the "
    "People to alter or to abolish it, and to institute new Government, laying its foundation on such principles "
    "and organizing its powers in such form, as to them shall seem most likely to effect their Safety and "
    "Happiness.\n")


def shard_tokens(folder, split):
    return [t for s in meta_of(folder)["shards"] if s["split"] == split for t in np.load(folder / s["file"]).tolist()]


def test_a_text_file_becomes_shards_with_val_first_and_exactly_its_ids(tmp_path, enc):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\n\tSpeak, speak.\n\n\n"
            "x \n\nB  \r\n日本語 🦙 don't 3.14\n") * 300  # runs of newlines and spaces, CRLF, emoji
    (tmp_path / "tiny.txt").write_text(text, newline="")
    folder = prepare(str(tmp_path / "tiny.txt"), tmp_path / "data", shard_tokens=2000)
    meta = meta_of(folder)
    val, train = shard_tokens(folder, "val"), shard_tokens(folder, "train")
    assert meta["kind"] == "text" and val + train == [EOT] + enc.encode_ordinary(text)  # exactly the whole text's ids
    assert 0.08 < len(val) / len(val + train) < 0.12 and meta["splits"] == {"train": len(train), "val": len(val)}
    assert len(meta["shards"]) == len(val) // 2000 + 1 + len(train) // 2000 + 1
    for shard in meta["shards"]:
        assert shard["sha256"] == pp.sha256_of(folder / shard["file"]) and shard["tokens"] <= 2000
    assert not (folder / ".prepare-text").exists() and not list(folder.glob("*.tmp"))


def test_text_records_and_folders_are_documents_separated_by_endoftext(tmp_path, enc, server):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {i}: " + "the quick brown fox " * (i + 1) for i in range(6)]
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:4]))
                                    + '\n{"id": 9}\n')  # FineWeb's shape; a record without text is skipped
    (corpus / "b.txt").write_text(docs[4])
    (corpus / "c.json").write_text(json.dumps([{"text": docs[5]}]))
    folder = prepare(str(corpus), tmp_path / "data", val_fraction=0.2)
    meta = meta_of(folder)
    assert shard_tokens(folder, "val") + shard_tokens(folder, "train") == [t for d in docs for t in [EOT, *enc.encode_ordinary(d)]]
    assert meta["counts"]["documents"] == 6 and meta["skipped"] == {"no text": 1} and folder.name == "corpus"
    url = server(corpus / "a.jsonl", name="web/fineweb.jsonl")  # at a URL, told from Alpaca records by their keys
    assert meta_of(prepare(url, tmp_path / "data", val_fraction=0.3))["kind"] == "text"
    assert meta_of(prepare(str(write_instructions(tmp_path / "mine.json", n=20)), tmp_path / "data"))["kind"] == "instruction"


def test_text_splits_by_bytes_and_is_prepared_again_only_for_the_settings_text_uses(tmp_path, enc, capsys):
    (tmp_path / "ja.txt").write_text("日本語の文章です。 これは試験です。\n" * 400)  # 3 bytes a character
    folder = prepare(str(tmp_path / "ja.txt"), tmp_path / "data", val_fraction=0.1)
    val_bytes = len(enc.decode(shard_tokens(folder, "val")[1:]).encode())
    assert 0.08 < val_bytes / (tmp_path / "ja.txt").stat().st_size < 0.12  # not 30%: bytes, as the file's size
    capsys.readouterr()
    assert prepare(str(tmp_path / "ja.txt"), tmp_path / "data", seed=7) == folder  # seed: no meaning for text
    assert "preparing it again" not in capsys.readouterr().err
    prepare(str(tmp_path / "ja.txt"), tmp_path / "data", val_fraction=0.2)
    assert "val_fraction=0.1 (not 0.2)" in capsys.readouterr().err and meta_of(folder)["val_fraction"] == 0.2
    (tmp_path / "cut.txt").write_bytes("a whole line\n".encode() * 50 + b"ab\xe2\x82")  # a character cut off
    with pytest.raises(ValueError, match="cut.txt is not UTF-8 text"):
        prepare(str(tmp_path / "cut.txt"), tmp_path / "data")


def test_an_interrupted_text_preparation_goes_on_from_its_last_shard(tmp_path, monkeypatch, enc):
    import corpus
    text = " ".join(f"word{i}" for i in range(30_000))
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 4000)
    encode, calls = corpus.encode_batch, []

    def interrupted(texts):
        calls.append(len(texts))
        if len(calls) == 6:
            raise KeyboardInterrupt
        return encode(texts)
    monkeypatch.setattr(corpus, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "big.txt"), tmp_path / "data", shard_tokens=5000)
    assert not (tmp_path / "data" / "big" / "meta.json").exists()  # no half dataset
    done = json.loads((tmp_path / "data" / "big" / ".prepare-text" / "progress.json").read_text())["shards"]
    pieces_before = sum(calls)
    calls.clear()
    monkeypatch.setattr(corpus, "encode_batch", encode)
    folder = prepare(str(tmp_path / "big.txt"), tmp_path / "data", shard_tokens=5000)
    assert meta_of(folder)["shards"][:len(done)] == done and len(done) >= 2  # kept, not written again
    assert shard_tokens(folder, "val") + shard_tokens(folder, "train") == [EOT] + enc.encode_ordinary(text)
    assert pieces_before > 0


def test_text_windows_are_random_per_process_and_fixed_for_evaluation(tmp_path):
    (tmp_path / "t.txt").write_text(DECLARATION * 20)
    folder = prepare(str(tmp_path / "t.txt"), tmp_path / "data", shard_tokens=1000)
    train = TextSplit(folder, "train")
    a, b = train.random_batch(4, 32, [1, 0, 7, 0]), train.random_batch(4, 32, [1, 1, 7, 0])
    assert torch.equal(a[0], train.random_batch(4, 32, [1, 0, 7, 0])[0])  # the same step draws the same windows
    assert not torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])  # per rank; targets shifted
    starts = train.starts(32)
    assert all(start + 32 < len(train.shards[k]) for k, start in starts)  # every window within its shard
    x, y = train.eval_batches(8, 0, 32)[0]
    assert torch.equal(x[0], torch.from_numpy(np.asarray(train.shards[0][:32], np.int64)))


def test_text_perplexity_equals_transformers_loss_on_the_same_windows(tmp_path, tiny):
    hf, folder_model = tiny
    (tmp_path / "t.txt").write_text(DECLARATION * 10)
    folder = prepare(str(tmp_path / "t.txt"), tmp_path / "data", shard_tokens=700)
    val = TextSplit(folder, "val")
    run = Run(0, 1, False, "cpu")
    ours = evaluate_loss(load(folder_model), val.eval_batches(4, 0, 64), run)
    with torch.no_grad():
        windows = [torch.cat([x, y[:, -1:]], 1) for x, y in val.eval_batches(4, 0, 64)]  # 65 tokens each
        losses = [(hf(w, labels=w).loss.item(), w[:, 1:].numel()) for w in windows]  # transformers shifts them itself
    reference = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert abs(ours - reference) <= 1e-4
    result = subprocess.run([sys.executable, str(HERE / "finetune.py"), f"--model={folder_model}", f"--dataset={tmp_path / 't.txt'}",
                             f"--data_dir={tmp_path / 'data'}", "--eval_only=True", "--block_size=64", "--batch_size=4",
                             "--dtype=float32"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"val loss {ours:.4f}, perplexity {math.exp(ours):.2f}" in result.stdout
    assert not (tmp_path / "out").exists()  # nothing written


def test_finetune_on_text_learns_resumes_exactly_and_continues_the_val_text(finetune_run):
    root = finetune_run.root
    (root / "declaration.txt").write_text(DECLARATION * 8)
    common = [f"--dataset={root / 'declaration.txt'}", "--block_size=64", "--batch_size=4", "--dtype=float32",
              "--lr=3e-3", "--min_lr=3e-3", "--dropout=0.1", "--eval_interval=10", "--eval_prompts=1",
              "--max_new_tokens=8"]  # a constant lr: 12 iterations and a resume to 30 follow the schedule of 30
    straight = finetune_run(*common, "--max_iters=30", "--out_dir=out/text")
    losses = logged(root / "out/text/log.jsonl")
    assert np.mean([losses[i] for i in range(26, 31)]) < np.mean([losses[i] for i in range(1, 6)]) - 2.0
    assert "iter 30: val loss" in straight.stdout and ", perplexity " in straight.stdout
    assert "> 'When in the Course" in straight.stdout or "  > '" in straight.stdout  # a continuation of val text
    assert not (root / "out/text/test_responses.json").exists()
    finetune_run(*common, "--max_iters=12", "--out_dir=out/text-resumed")
    resumed = subprocess.run([sys.executable, str(HERE / "finetune.py"), "--resume=True", "--out_dir=out/text-resumed",
                              "--max_iters=30"], cwd=root, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert logged(root / "out/text-resumed/log.jsonl") == losses  # bit for bit: the same windows after a resume


# ----------------------------------------------------------------------------- a run never loses an earlier one

def test_a_second_run_never_replaces_the_first_without_being_asked(finetune_run):
    out = finetune_run.root / "out" / "keep"
    finetune_run("--max_iters=2", "--eval_interval=2", "--out_dir=out/keep", "--test_responses=True")
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "best.pt", "log.jsonl", "test_responses.json")}
    again = finetune_run("--max_iters=2", "--eval_interval=2", "--out_dir=out/keep", check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "ckpt.pt" in again.stderr and "--resume=True" in again.stderr and "--overwrite=True" in again.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    finetune_run("--max_iters=1", "--eval_interval=1", "--out_dir=out/keep", "--overwrite=True")
    assert not (out / "test_responses.json").exists()  # nothing of the old run is left beside the new one
    assert list(logged(out / "log.jsonl")) == [1] and not (out / "run.lock").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 1


def test_a_resumed_run_may_extend_but_not_contradict_its_settings(finetune_run):
    finetune_run("--max_iters=2", "--eval_interval=2", "--out_dir=out/extend")
    resume = ("--resume=True", "--out_dir=out/extend")
    longer = finetune_run(*resume, "--max_iters=4", "--eval_interval=4")
    assert "with max_iters 2 -> 4; eval_interval 2 -> 4" in longer.stdout
    assert list(logged(finetune_run.root / "out/extend/log.jsonl")) == [1, 2, 3, 4]
    for given, refused in (("--batch_size=2", "batch_size=2 (it was 8)"), ("--lora_rank=4", "lora_rank=4 (it was 0)"),
                           (f"--dataset={write_instructions(finetune_run.root / 'other.json', n=30)}", "dataset=")):
        result = finetune_run(*resume, given, "--max_iters=6", check=False)
        assert result.returncode == 2 and f"cannot go on with {refused}" in result.stderr, result.stderr


def test_a_second_run_at_once_into_one_out_dir_is_refused(finetune_run):
    out = finetune_run.root / "out" / "locked"
    out.mkdir(parents=True)
    (out / "run.lock").write_text(str(os.getpid()))  # a live process holds it
    busy = finetune_run("--max_iters=1", "--out_dir=out/locked", check=False)
    assert busy.returncode == 2 and f"another run (process {os.getpid()}) is writing to" in busy.stderr
    (out / "run.lock").write_text("999999999")  # left by a run that was killed
    finetune_run("--max_iters=1", "--eval_interval=1", "--out_dir=out/locked")
    assert not (out / "run.lock").exists() and (out / "ckpt.pt").exists()


def test_the_log_is_only_ever_appended_to_and_a_torn_line_is_skipped(tmp_path, capsys):
    log = RunLog(tmp_path)
    for it in (1, 2, 3):
        log.write({"iter": it, "loss": 10.0 - it})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 4, "lo')  # a crash mid-line
    written = (tmp_path / "log.jsonl").read_bytes()
    resumed = RunLog(tmp_path, start_iter=2, resumed=True)  # the checkpoint was at iteration 2
    assert "line 4 of" in capsys.readouterr().err and [r["iter"] for r in resumed.records] == [1, 2]
    resumed.write({"iter": 3, "loss": 6.5})
    assert (tmp_path / "log.jsonl").read_bytes().startswith(written)  # never rewritten
    assert [(r["iter"], r["loss"]) for r in read_log(tmp_path / "log.jsonl")] == [(1, 9.0), (2, 8.0), (3, 6.5)]


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(finetune_run):
    import resource
    out = finetune_run.root / "out" / "full"
    finetune_run("--max_iters=2", "--eval_interval=2", "--out_dir=out/full")
    saved, best = (out / "ckpt.pt").read_bytes(), (out / "best.pt").read_bytes()

    def small_disk():  # files may grow to half a checkpoint: as a full disk does, writes fail with an OSError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(saved) // 2, len(saved) // 2))
    full = finetune_run("--resume=True", "--out_dir=out/full", "--max_iters=4", "--eval_interval=4", check=False,
                        preexec_fn=small_disk)
    assert full.returncode == 1 and full.stderr.count("\n") == 1 and "Traceback" not in full.stderr, full.stderr
    assert re.search(r"could not write out/full/(ckpt|best).pt \(File too large\): it needs about \d+ MB", full.stderr)
    assert (out / "ckpt.pt").read_bytes() == saved and (out / "best.pt").read_bytes() == best
    assert not list(out.glob("*.tmp"))


def test_a_save_into_a_folder_that_refuses_writes_says_so(tmp_path, monkeypatch):
    save_atomic({"iter_num": 1}, tmp_path / "ckpt.pt")

    def refuse(obj, f):
        f.write(b"half")
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(OSError, match=r"could not write .*ckpt.pt \(Permission denied\): it needs about 0 MB"):
        save_atomic({"iter_num": 2, "w": torch.zeros(10)}, tmp_path / "ckpt.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_damaged_checkpoint_is_refused_before_it_is_used(finetune_run, tiny):
    out = finetune_run.root / "out" / "damaged"
    finetune_run("--max_iters=1", "--eval_interval=1", "--out_dir=out/damaged")
    data = bytearray((out / "ckpt.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside the weights or the optimizer state
    (out / "ckpt.pt").write_bytes(data)
    resumed = finetune_run("--resume=True", "--out_dir=out/damaged", "--max_iters=2", check=False)
    assert resumed.returncode == 2 and "is damaged: its record" in resumed.stderr, resumed.stderr
    with pytest.raises(ValueError, match="is damaged"):
        load(out / "ckpt.pt")
    generated = sample(f"--model={out / 'ckpt.pt'}")
    assert generated.returncode == 2 and "is damaged" in generated.stderr and "Traceback" not in generated.stderr


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("scaler"), "cannot be resumed: its scaler is missing"),
    (lambda c: c.update(optimizer="adam"), "cannot be resumed: its optimizer is missing or not"),
    (lambda c: c.update(rng={"torch": torch.zeros(3, dtype=torch.uint8), "cuda": []}), "RNG state does not fit"),
    (lambda c: c["model_config"].update(n_head=5), "n_embd=64 is not divisible by n_head=5"),
])
def test_hostile_checkpoint_contents_are_one_line_on_resume(finetune_run, change, message):
    out = finetune_run.root / "out" / "hostile"
    if not (out / "good.pt").exists():
        finetune_run("--max_iters=1", "--eval_interval=1", "--out_dir=out/hostile")
        (out / "ckpt.pt").rename(out / "good.pt")
    ckpt = torch.load(out / "good.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, out / "ckpt.pt")
    result = finetune_run("--resume=True", "--out_dir=out/hostile", "--max_iters=2", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_examples_longer_than_the_models_context_are_refused_before_training(finetune_run):
    reference_model(n_positions=32).save_pretrained(finetune_run.root / "tiny32")
    result = finetune_run(f"--model={finetune_run.root / 'tiny32'}", "--out_dir=out/short", check=False)
    assert result.returncode == 2 and "but the model's context is 32: set --max_length=33" in result.stderr
    assert not (finetune_run.root / "out" / "short" / "ckpt.pt").exists()


def test_world_size_without_torchrun_is_one_line(finetune_run):
    result = finetune_run("--out_dir=out/ws", check=False, env={**os.environ, "WORLD_SIZE": "2"})
    assert result.returncode == 2 and "WORLD_SIZE=2 is set but RANK" in result.stderr and "torchrun" in result.stderr


# ----------------------------------------------------------------------------- what a hostile-input hunt found

def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(finetune_run):
    out = finetune_run.root / "out" / "keep2"
    finetune_run("--max_iters=1", "--eval_interval=1", "--out_dir=out/keep2")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    typo = finetune_run("--model=/nonexistent/tiny", "--out_dir=out/keep2", "--overwrite=True", check=False)
    assert typo.returncode == 2 and "could not load model" in typo.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_results_that_are_links_are_refused(finetune_run, tmp_path):
    out = finetune_run.root / "out" / "linked"
    finetune_run("--max_iters=1", "--eval_interval=1", "--out_dir=out/linked")
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(victim)
    result = finetune_run("--resume=True", "--out_dir=out/linked", "--max_iters=2", check=False)
    assert result.returncode == 2 and "log.jsonl as a link or a folder" in result.stderr
    assert victim.read_text() == "someone else's file\n"


def test_a_new_url_whose_file_has_the_same_name_is_downloaded_anew(server, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = server(write_instructions(tmp_path / "a" / "x.json", n=20), name="a/x.json")
    second = server(write_instructions(tmp_path / "b" / "x.json", n=40, seed=1), name="b/x.json")
    assert meta_of(prepare(first, tmp_path / "data"))["counts"]["read"] == 20
    meta = meta_of(prepare(second, tmp_path / "data"))
    assert meta["counts"]["read"] == 40 and meta["source"] == second  # not the first URL's file


def test_downloads_have_a_size_limit_and_an_unverifiable_part_is_not_resumed(hub, tiny, tmp_path):
    with pytest.raises(DownloadError, match="more than the 100 this file can be|more than 100 bytes arrived"):
        download.download(f"{hub.url}/openai-community/gpt2/resolve/main/config.json", tmp_path / "c.json",
                          max_bytes=100)
    assert not (tmp_path / "c.json.part").exists()
    folder = load_gpt2.cache_dir() / "gpt2"  # config.json: no sha256 is announced for it, as on the hub
    folder.mkdir(parents=True)
    real = (tiny[1] / "config.json").read_bytes()
    (folder / "config.json.part").write_bytes(b'{"n_layer": 99, "hostile": ' + b" " * (len(real) // 2))
    load("gpt2")
    assert (folder / "config.json").read_bytes() == real  # started over: nothing could check the bytes kept


def test_hostile_sizes_and_templates_in_model_files_are_refused_at_once(tiny, tmp_path):
    gpt = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    start = time.time()
    torch.save({"model": gpt.state_dict(), "model_config": {**vars(gpt.config), "n_layer": 1000}}, tmp_path / "big.pt")
    with pytest.raises(ValueError, match="says n_layer=1000 but holds 1 blocks"):
        load(tmp_path / "big.pt")
    torch.save({"model": {**gpt.state_dict(), "wte.weight": "hello"}, "model_config": vars(gpt.config)},
               tmp_path / "str.pt")
    with pytest.raises(ValueError, match="weights are not all tensors: wte.weight"):
        load(tmp_path / "str.pt")
    ours = load(tiny[1])
    torch.save({"model": ours.state_dict(), "model_config": vars(ours.config),
                "template": {"prompt": "{instruction:>999999999}", "prompt_input": "{instruction}{input}"}},
               tmp_path / "spec.pt")
    with pytest.raises(ValueError, match="no format specs"):
        load_gpt2.load_model(tmp_path / "spec.pt")
    assert time.time() - start < 30


def test_damaged_zip_members_and_overlong_lines_are_skipped(tmp_path, monkeypatch):
    xml = qa_xml("What is it?", "A test.")
    with zipfile.ZipFile(tmp_path / "medquad.zip", "w", zipfile.ZIP_STORED) as z:
        z.writestr("m/1.xml", xml)
        z.writestr("m/2.xml", xml.replace("A test.", "A second test."))
    data = bytearray((tmp_path / "medquad.zip").read_bytes())
    data[data.index(b"A second test.")] ^= 1  # the second member fails its CRC as it is read
    (tmp_path / "medquad.zip").write_bytes(data)
    meta = meta_of(prepare("medquad", tmp_path / "data", urls={"medquad": str(tmp_path / "medquad.zip")}))
    assert meta["counts"]["examples"] == 1 and meta["skipped"] == {"unreadable member (BadZipFile)": 1}
    monkeypatch.setattr(readers, "MAX_LINE", 1000)
    (tmp_path / "long.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "output": "x" * 5000}) + "\n")
    assert meta_of(prepare(str(tmp_path / "long.jsonl"), tmp_path / "data"))["counts"]["examples"] == 1


def test_a_ddp_process_group_that_never_fills_stops_with_a_line(finetune_run):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "NANOFT_DDP_TIMEOUT": "3"}  # the second process never starts
    result = finetune_run("--out_dir=out/alone", check=False, env=env)
    assert result.returncode == 2 and "did not come together" in result.stderr and "Traceback" not in result.stderr


def test_settings_that_are_nan_in_a_config_file_are_one_line(finetune_run):
    (finetune_run.root / "nan.py").write_text("lr = float('nan')\n")
    result = finetune_run(str(finetune_run.root / "nan.py"), check=False)
    assert result.returncode == 2 and "is not a finite number" in result.stderr and "Traceback" not in result.stderr


def test_a_classifier_whose_head_does_not_fit_its_labels_is_one_line(fitted, classify_run):
    ckpt = torch.load(fitted[0] / "ckpt.pt", weights_only=True)
    ckpt["model"]["head.weight"] = torch.zeros(5, 64)
    torch.save(ckpt, classify_run.root / "head.pt")
    result = classify_run(f"--model={classify_run.root / 'head.pt'}", "--text=hi", check=False)
    assert result.returncode == 2 and "its head" in result.stderr and result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- the GPU paths (run where CUDA is)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the CUDA paths (autocast with "
                                "the scaler, torch.compile, TF32, NCCL, int8 on CUDA) are tested where one is")


@needs_cuda
def test_cuda_training_with_autocast_and_compile_resumes(finetune_run):
    common = ["--device=cuda", "--compile=True", "--dtype=auto", "--lr=1e-3", "--min_lr=1e-3", "--eval_interval=3",
              "--eval_prompts=1"]
    straight = finetune_run(*common, "--max_iters=6", "--out_dir=out/cuda")
    assert "on cuda:0, autocast torch.bfloat16" in straight.stdout or "autocast torch.float16" in straight.stdout
    finetune_run(*common, "--max_iters=3", "--out_dir=out/cuda-resumed")
    finetune_run(*common, "--max_iters=6", "--out_dir=out/cuda-resumed", "--resume=True")
    one, two = (logged(finetune_run.root / f"out/{d}/log.jsonl") for d in ("cuda", "cuda-resumed"))
    assert list(one) == list(two) == list(range(1, 7)) and all(np.isfinite(list(one.values())))
    assert all(abs(one[i] - two[i]) < 1e-2 for i in one)  # compiled GPU kernels need not be bit for bit
    assert np.mean([one[5], one[6]]) < np.mean([one[1], one[2]])


@needs_cuda
def test_cuda_greedy_generation_equals_cpu_float32_and_int8_runs(tiny):
    cpu, gpu = load(tiny[1]), load(tiny[1], device="cuda")
    prompt = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = cpu.generate(prompt, 20, temperature=0)
    assert torch.equal(gpu.generate(prompt.cuda(), 20, temperature=0).cpu(), expected)
    gpu.compile_decode()
    assert torch.equal(gpu.generate(prompt.cuda(), 20, temperature=0).cpu(), expected)
    q = quantize_int8(load(tiny[1], device="cuda"))
    same = (q.generate(prompt.cuda(), 20, temperature=0).cpu() == expected).float().mean().item()
    assert same >= 0.8


@needs_cuda
def test_cuda_classifier_trains_and_predicts(classify_run):
    classify_run("--device=cuda", "--dtype=auto", "--train_subset=32", "--epochs=2", "--lr=1e-3", "--out_dir=out/cuda")
    predicted = classify_run(f"--model={classify_run.root / 'out/cuda/ckpt.pt'}", "--device=cuda", "--text=hello")
    assert predicted.stdout.split("\t")[0] in ("ham", "spam")


@needs_cuda
def test_cuda_torchrun_with_nccl_on_one_process(finetune_run):
    result = finetune_run("--device=auto", "--max_iters=2", "--eval_interval=2", "--out_dir=out/nccl",
                          launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                                    f"--master_port={free_port()}"))
    assert "1 process(es)" in result.stdout and (finetune_run.root / "out/nccl/ckpt.pt").exists()


# ----------------------------------------------------------------------------- classify.py

def small_classifier(pooling="last_real"):
    torch.manual_seed(0)
    return Classifier(GPT(GPTConfig(block_size=64, n_layer=3, n_head=2, n_embd=32)), 3, pooling).eval()


# ----------------------------------------------------------------------------- batching and pooling

def test_collate_pads_right_with_eot_and_cuts_to_the_context():
    idx, lengths, labels = collate_labelled([([1, 2, 3], 1), ([4], 0), ([5, 6, 7, 8, 9], 2)], max_len=4)
    assert idx.tolist() == [[1, 2, 3, EOT], [4, EOT, EOT, EOT], [5, 6, 7, 8]]  # longest of the batch, not 1024
    assert lengths.tolist() == [3, 1, 4] and labels.tolist() == [1, 0, 2]


def test_pooling_picks_the_last_real_token_or_the_last_position():
    hidden = torch.arange(10.0).view(2, 5, 1).expand(2, 5, 3)  # hidden[b, t] = 5b + t
    lengths = torch.tensor([3, 5])
    assert pool(hidden, lengths, "last_real")[:, 0].tolist() == [2, 9]
    assert pool(hidden, lengths, "last")[:, 0].tolist() == [4, 9]


@torch.no_grad()
def test_last_real_pooling_ignores_padding_last_pooling_does_not():
    alone = torch.tensor([[11, 12, 13]])
    padded, lengths, _ = collate_labelled([([11, 12, 13], 0), ([1, 2, 3, 4, 5, 6], 0)], max_len=64)
    real, last = small_classifier("last_real"), small_classifier("last")
    assert torch.allclose(real(padded, lengths)[0][0], real(alone, torch.tensor([3]))[0][0], atol=1e-6)
    assert not torch.allclose(last(padded, lengths)[0][0], last(alone, torch.tensor([3]))[0][0], atol=1e-3)


# ----------------------------------------------------------------------------- what is trained

def n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("trainable", ["head", "last", "0", "2", "all"])
def test_trainable_modes_freeze_exactly_what_they_say(trainable):
    clf = small_classifier()
    gpt = clf.gpt
    expected = {"head": n_params(clf.head), "last": n_params(clf.head, gpt.ln_f, gpt.h[-1]),
                "0": n_params(clf.head, gpt.ln_f), "2": n_params(clf.head, gpt.ln_f, gpt.h[-2], gpt.h[-1]),
                "all": n_params(clf)}[trainable]
    freeze(clf, trainable)
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) == expected
    groups = make_optimizer(clf, 1e-3, 0.1, (0.9, 0.999), "cpu").param_groups
    assert sum(p.numel() for g in groups for p in g["params"]) == expected
    assert gpt.wte.weight.requires_grad == (trainable == "all") == gpt.h[0].attn.c_attn.weight.requires_grad


def test_trainable_last_on_gpt2_is_the_books_7_1m_of_124m():
    with torch.device("meta"):  # shapes only
        clf = Classifier(GPT(GPTConfig.from_name("gpt2")), 2)
    assert trainable_line(freeze(clf, "last"), None).startswith("7,090,946 of 124,441,346 parameters trainable")


# ----------------------------------------------------------------------------- the script on real data

@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A folder with a tiny GPT-2 and a CSV of labelled messages the test wrote, and a function that runs
    classify.py there on them."""
    root = tmp_path_factory.mktemp("classify")
    reference_model(n_positions=256).save_pretrained(root / "tiny")
    write_messages(root / "messages.csv")

    def cmd(*args, launcher=(sys.executable,)):
        return [*launcher, str(HERE / "classify.py"), f"--model={root / 'tiny'}", "--dtype=float32",
                f"--dataset={root / 'messages.csv'}", *args]

    def run(*args, launcher=(sys.executable,), check=True):
        result = subprocess.run(cmd(*args, launcher=launcher), cwd=root, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result
    run.root, run.cmd, run.data = root, cmd, root / "data" / "messages"
    return run


@pytest.fixture(scope="module")
def fitted(classify_run):
    """32 training messages learned by the whole tiny model: (out folder, stdout)."""
    result = classify_run("--train_subset=32", "--trainable=all", "--lr=1e-3", "--epochs=8", "--out_dir=out/fit")
    return classify_run.root / "out" / "fit", result.stdout


def epoch_log(out):
    return read_log(out / "log.jsonl")


def test_pooling_positions_on_a_batch_of_messages(fitted, classify_run):
    split = LabelledSplit(classify_run.data, "train")
    examples = [split.example(i) for i in range(8)]
    idx, lengths, labels = split.batch(range(8), max_len=256, device="cpu")
    assert lengths.tolist() == [len(ids) for ids, _ in examples] and idx.size(1) == max(lengths) < 256
    for row, (ids, label) in enumerate(examples):  # right padding: real tokens first, then <|endoftext|>
        assert idx[row, :lengths[row]].tolist() == ids.tolist() and (idx[row, lengths[row]:] == EOT).all()
        assert labels[row] == label
    hidden = torch.arange(float(idx.size(1))).expand(8, -1)[..., None]  # hidden[b, t] = t
    assert pool(hidden, lengths, "last_real")[:, 0].tolist() == [len(ids) - 1 for ids, _ in examples]
    assert pool(hidden, lengths, "last")[:, 0].tolist() == [idx.size(1) - 1] * 8


def test_small_training_subset_is_learned_to_100_percent(fitted):
    out, stdout = fitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"]["train"] == 1.0
    log = epoch_log(out)
    assert [r["epoch"] for r in log] == list(range(1, 9)) and log[-1]["train_loss"] < log[0]["train_loss"] / 10
    assert "3,333,058 of 3,333,058 parameters trainable (100%; trainable=all)" in stdout and "accuracy: train 100.00%" in stdout
    assert "epoch 8/8 | train loss" in stdout and "test confusion" in stdout


def test_metrics_json_agrees_with_its_confusion_matrices(fitted):
    metrics = json.loads((fitted[0] / "metrics.json").read_text())
    assert metrics["labels"] == ["ham", "spam"]
    for split, size in (("train", 32), ("val", 30), ("test", 60)):
        confusion = np.array(metrics["confusion"][split])
        assert confusion.shape == (2, 2) and confusion.sum() == size
        assert metrics["accuracy"][split] == pytest.approx(np.trace(confusion) / size)
    test = np.array(metrics["confusion"]["test"])  # rows = true label, columns = predicted
    truth = np.bincount(load_split(fitted[0].parents[1] / "data" / "messages", "test")["labels"], minlength=2)
    assert test.sum(axis=1).tolist() == truth.tolist()
    for i, label in enumerate(metrics["labels"]):
        m = metrics["per_class"][label]
        precision, recall = test[i, i] / test[:, i].sum(), test[i, i] / test[i].sum()
        assert m["precision"] == pytest.approx(precision) and m["recall"] == pytest.approx(recall)
        assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall)) and m["support"] == truth[i]


def test_a_csv_of_your_own_with_three_labels(classify_run):
    rows = [f'{label},"{text} {i}"' for i in range(30) for label, text in
            (("good", "I love it, really"), ("bad", "Terrible, never again"), ("so-so", "It was fine I guess"))]
    (classify_run.root / "reviews.csv").write_text("label,text\n" + "\n".join(rows) + "\n")
    classify_run("--dataset=reviews.csv", "--epochs=2", "--trainable=all", "--lr=1e-3", "--out_dir=out/reviews")
    metrics = json.loads((classify_run.root / "out/reviews/metrics.json").read_text())
    assert metrics["labels"] == ["bad", "good", "so-so"] and set(metrics["per_class"]) == {"bad", "good", "so-so"}
    test_size = len(load_split(classify_run.root / "data" / "reviews", "test")["labels"])
    assert np.array(metrics["confusion"]["test"]).shape == (3, 3) and np.sum(metrics["confusion"]["test"]) == test_size
    assert read_checkpoint(classify_run.root / "out/reviews/ckpt.pt")["labels"] == ["bad", "good", "so-so"]


def test_checkpoint_is_a_classifier_with_its_labels(fitted):
    ckpt = read_checkpoint(fitted[0] / "ckpt.pt")
    assert ckpt["kind"] == "classifier" and ckpt["labels"] == ["ham", "spam"] and ckpt["pooling"] == "last_real"
    assert {"gpt.h.1.attn.c_attn.weight", "head.weight", "head.bias"} <= set(ckpt["model"])
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"]) and ckpt["config"]["trainable"] == "all"
    assert load_classifier(ckpt).head.weight.shape == (2, 64)


def test_predict_mode_prints_label_and_probability_per_line(fitted, classify_run):
    out, root = fitted[0], classify_run.root
    one = classify_run(f"--model={out / 'ckpt.pt'}", "--text=WINNER!! Claim your prize")
    label, probability, message = one.stdout.rstrip("\n").split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(probability) <= 1 and message == "WINNER!! Claim your prize"
    train = load_records(classify_run.data, "train")[:32]  # learned to 100%: predicted as labelled
    (root / "messages.txt").write_text("\n".join(r["text"] for r in train[:16]) + "\n\n" +
                                       "\n".join(r["text"] for r in train[16:]) + "\n")
    lines = classify_run(f"--model={out / 'ckpt.pt'}", f"--text=FILE:{root / 'messages.txt'}").stdout.splitlines()
    assert [line.split("\t", 2)[2] for line in lines] == [r["text"] for r in train]  # the blank line skipped
    assert [line.split("\t")[0] for line in lines] == [r["label"] for r in train]


def test_a_checkpoint_that_is_not_a_classifier_is_rejected(classify_run):
    root = classify_run.root
    gpt = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": gpt.state_dict(), "model_config": vars(gpt.config)}, root / "finetuned.pt")
    (root / "junk.pt").write_bytes(b"not a checkpoint")
    for model, message in ((root / "finetuned.pt", "is a GPT-2 language model, not a classifier (an instruction"),
                           (root / "tiny", "is a GPT-2 language model, not a classifier"),
                           ("gpt2", "is a GPT-2 language model, not a classifier"),
                           (root / "junk.pt", "is not a checkpoint this project can read"),
                           (root / "missing.pt", "does not exist")):
        result = classify_run(f"--model={model}", "--text=hello", check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--trainable=some"], "trainable='some' must be head, last, all or a number of last blocks"),
    (["--pooling=first"], "pooling='first' must be last_real or last"),
    (["--trainable=7"], "trainable=7 but the model has 2 blocks"),
    (["--resume=True", "--out_dir=out/none"], "no checkpoint at out/none/ckpt.pt"),
    (["--trainable=²"], "trainable='²' must be head, last, all or a number of last blocks"),
    (["--text="], "--text is empty: give a message"),
    (["--out_dir=out/fit"], "already holds an earlier run's ckpt.pt"),
])
def test_bad_settings_are_rejected_in_one_line(classify_run, fitted, args, message):
    result = classify_run(*args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


def test_hostile_classifier_checkpoints_and_files_are_one_line(fitted, classify_run):
    root = classify_run.root
    ckpt = torch.load(fitted[0] / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "labels": "ham"}, root / "labels.pt")
    (root / "latin1.txt").write_bytes("caf\xe9 ouvert\n".encode("latin-1"))
    for args, message in (([f"--model={root / 'labels.pt'}", "--text=hi"], "has no list of labels"),
                          ([f"--model={fitted[0] / 'ckpt.pt'}", f"--text=FILE:{root / 'latin1.txt'}"], "is not UTF-8")):
        result = classify_run(*args, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_instruction_dataset_is_refused(classify_run):
    data = write_instructions(classify_run.root / "instructions.json", n=20)
    result = classify_run(f"--dataset={data}", check=False)
    assert result.returncode == 2 and "is instruction data, not labelled examples" in result.stderr


def test_classifier_nan_loss_stops_with_a_message(classify_run):
    result = classify_run("--train_subset=32", "--lr=1e30", "--trainable=all", "--out_dir=out/nan", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the loss became nan at iteration" in result.stderr and "lower lr" in result.stderr
    assert not (classify_run.root / "out/nan/ckpt.pt").exists()


def test_classifier_sigint_saves_and_resume_continues_exactly(classify_run):
    common = ["--train_subset=32", "--epochs=2", "--trainable=all", "--lr=1e-3", "--dropout=0.1", "--log_interval=1"]
    classify_run(*common, "--out_dir=out/straight")
    root = classify_run.root
    status, rest = interrupted_at("iter 2/8", classify_run.cmd(*common, "--out_dir=out/stopped"), root)
    assert status == 130 and "continue with --resume=True" in rest
    assert 2 <= torch.load(root / "out/stopped/ckpt.pt", weights_only=True)["iter_num"] < 8
    classify_run(*common, "--out_dir=out/stopped", "--resume=True")
    keys = ("iter", "train_loss", "train_acc", "val_loss", "val_acc")
    straight, resumed = ([{k: r[k] for k in keys} for r in epoch_log(root / "out" / d)]
                         for d in ("straight", "stopped"))
    assert resumed == straight  # bit for bit on CPU fp32, dropout included
    metrics = [json.loads((root / "out" / d / "metrics.json").read_text()) for d in ("straight", "stopped")]
    assert metrics[0] == metrics[1]


def test_ddp_on_two_processes_evaluates_like_one(classify_run):
    common = ["--train_subset=32", "--epochs=1", "--lr=0.0", "--batch_size=4"]  # lr 0: the same model in both
    classify_run(*common, "--out_dir=out/one")
    classify_run(*common, "--out_dir=out/two",
                 launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"))
    one, two = (json.loads((classify_run.root / "out" / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["confusion"] == two["confusion"] and one["accuracy"] == two["accuracy"]
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)


def test_load_gpt2_says_a_classifier_is_not_a_language_model(fitted):
    with pytest.raises(ValueError, match=r"is a text classifier \(ham, spam\) written by classify.py"):
        load(fitted[0] / "ckpt.pt")


# ----------------------------------------------------------------------------- LoRA

def trainable_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_lora_parameter_counts_are_the_books():
    # rank 16 on q, k, v, attn.c_proj, mlp.c_fc, mlp.c_proj and the output head ("Build a LLM from scratch")
    with torch.device("meta"):  # shapes only
        medium = add_lora(GPT(GPTConfig.from_name("gpt2-medium")), rank=16, alpha=16)
        spam = head_trains_unless_adapted(add_lora(Classifier(GPT(GPTConfig.from_name("gpt2")), 2), 16, 16, head="head"),
                                          {"targets": LORA_TARGETS})
        fused = add_lora(GPT(GPTConfig.from_name("gpt2")), 16, 16, targets=("attn.c_attn",))
    assert sum(p.numel() for p in trainable_params(medium).values()) == 7_898_384  # appendix E / ch07
    assert sum(p.numel() for p in trainable_params(spam).values()) == 2_666_528  # spam classifier, gpt2
    assert sum(p.numel() for p in trainable_params(fused).values()) == 12 * 16 * (768 + 3 * 768)  # one A, one B


def test_lora_starts_at_the_base_model_and_trains_only_adapters(tiny):
    torch.manual_seed(0)
    gpt = load(tiny[1])
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = gpt(idx)[0]
    add_lora(gpt, rank=4, alpha=8, targets=("q", "v", "mlp.c_fc", "head"))
    with torch.no_grad():
        assert torch.equal(gpt(idx)[0], base)  # B = 0: exactly the base model
    frozen = {n: p.detach().clone() for n, p in gpt.named_parameters() if not p.requires_grad}
    assert set(trainable_params(gpt)) == {f"h.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
                                          for ab in "AB"} | {"lm_head.lora_A", "lm_head.lora_B"}
    opt = make_optimizer(gpt.train(), 1e-2, 0.1, (0.9, 0.95), "cpu")
    gpt(idx, idx)[1].backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in gpt.named_parameters() if n in frozen)
    assert all(p.abs().sum() > 0 for n, p in gpt.named_parameters() if n.endswith("lora_B"))
    assert gpt.lm_head.weight is gpt.wte.weight  # the adapter sits beside the tied head, which stays frozen


def randomised_adapters(gpt, **lora):
    add_lora(gpt, **lora)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return gpt


def test_merged_lora_equals_adapters_and_exports_as_plain_gpt2(tiny, tmp_path):
    torch.manual_seed(0)
    gpt = randomised_adapters(load(tiny[1]), rank=4, alpha=16, targets=("q", "k", "attn.c_proj", "mlp.c_proj", "head"))
    idx = torch.randint(0, 50257, (2, 25), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        adapted = gpt(idx)[0]
        merge_lora(gpt)
        assert not any(isinstance(m, LoRALinear) for m in gpt.modules())
        assert (gpt(idx)[0] - adapted).abs().max().item() <= 1e-5
    assert gpt.lm_head.weight is not gpt.wte.weight and torch.equal(gpt.wte.weight, load(tiny[1]).wte.weight)
    export_hf(gpt, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert max_logit_diff(hf, gpt, idx) <= 1e-5  # transformers reads the merged, untied model
    assert max_logit_diff(hf, load(tmp_path / "merged"), idx) <= 1e-5  # and so do we


def test_lora_checkpoint_loads_merged_or_as_adapters(tiny, tmp_path):
    torch.manual_seed(0)
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    gpt = randomised_adapters(load(tiny[1]), **lora)
    torch.save({"model": gpt.state_dict(), "model_config": vars(gpt.config), "lora": lora}, tmp_path / "ckpt.pt")
    idx = torch.randint(0, 50257, (2, 25), generator=torch.Generator().manual_seed(9))
    merged, unmerged = load(tmp_path / "ckpt.pt"), load(tmp_path / "ckpt.pt", merge_lora=False)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert sum(isinstance(m, LoRALinear) for m in unmerged.modules()) == 2 * 4 + 1
    with torch.no_grad():
        assert torch.equal(unmerged(idx)[0], gpt(idx)[0])
        assert (merged(idx)[0] - gpt(idx)[0]).abs().max().item() <= 1e-5
    torch.save({"model": gpt.state_dict(), "model_config": vars(gpt.config), "lora": {**lora, "rank": 8}},
               tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="LoRA tensors do not fit rank 8"):
        load(tmp_path / "wrong.pt")


def test_lora_targets_are_checked():
    gpt = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    for targets, message in ((("q", "attn.c_attn"), "choose one"), (("query",), "unknown LoRA target")):
        with pytest.raises(ValueError, match=message):
            add_lora(gpt, 4, 8, targets=targets)
    assert all(p.requires_grad for p in gpt.parameters())  # a refused call changes nothing
    settings = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_targets": "head, v,q"}
    assert lora_settings(settings)["targets"] == ["q", "v", "head"]  # one order: a resume compares them


def test_a_classifier_ties_the_lm_head_it_never_uses(tiny, tmp_path):
    gpt = randomised_adapters(load(tiny[1]), rank=4, alpha=8, targets=("head",))
    merge_lora(gpt)  # a merged LoRA head: untied from wte
    clf = freeze(Classifier(gpt, 2), "all")
    assert clf.gpt.lm_head.weight is clf.gpt.wte.weight  # so nothing unused trains (DDP would refuse it)


def test_finetune_with_lora_trains_adapters_and_resumes_exactly(finetune_run):
    # a constant lr (min_lr = lr), so 3 iterations + a resume to 6 follow the same schedule as 6 at once
    common = ["--lora_rank=4", "--lora_alpha=8", "--lora_dropout=0.1", "--dtype=float32", "--lr=1e-2",
              "--min_lr=1e-2", "--eval_interval=3", "--eval_prompts=0"]
    straight = finetune_run(*common, "--max_iters=6", "--out_dir=out/lora")
    # per block q, k, v 3 x 4 x (64 + 64), attn.c_proj 4 x (64 + 64), mlp.c_fc and mlp.c_proj 4 x (64 + 256) each;
    # the head 4 x (64 + 50257): 210,500 of the tiny model's 3,332,928 + 210,500
    assert ("210,500 of 3,543,428 parameters trainable (5.94%; LoRA rank 4, alpha 8 on q,k,v,attn.c_proj,mlp.c_fc,"
            "mlp.c_proj,head)") in straight.stdout
    finetune_run(*common, "--max_iters=3", "--out_dir=out/lora-resumed")
    finetune_run(*common, "--max_iters=6", "--out_dir=out/lora-resumed", "--resume=True")
    root = finetune_run.root
    assert logged(root / "out/lora/log.jsonl") == logged(root / "out/lora-resumed/log.jsonl")  # bit for bit
    ckpt = torch.load(root / "out/lora/ckpt.pt", weights_only=True)
    base = load(root / "tiny").state_dict()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in base.items())  # the model itself stayed frozen
    assert ckpt["lora"]["rank"] == 4 and any(".lora_B" in k for k in ckpt["model"])
    gpt = load(root / "out/lora/ckpt.pt")  # what sample.py and export_hf see: a plain GPT-2
    assert not any(isinstance(m, LoRALinear) for m in gpt.modules())
    other = finetune_run(*common, "--lora_rank=8", "--max_iters=6", "--out_dir=out/lora", "--resume=True", check=False)
    assert other.returncode == 2 and "cannot go on with lora_rank=8 (it was 4)" in other.stderr
    (root / "out/lora/ckpt.pt").write_bytes(b"half a checkpoint")  # e.g. copied over by hand, cut short
    broken = finetune_run(*common, "--max_iters=6", "--out_dir=out/lora", "--resume=True", check=False)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr and "could not read" in broken.stderr


def test_lora_with_ddp_on_two_processes_equals_one_process(finetune_run):
    common = ["--max_iters=2", "--eval_interval=2", "--dtype=float32", "--batch_size=4", "--eval_prompts=0",
              "--lora_rank=4", "--lr=1e-2"]
    finetune_run(*common, "--grad_accum=2", "--out_dir=out/lora-one")
    finetune_run(*common, "--grad_accum=1", "--out_dir=out/lora-two",
                 launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"))
    one, two = (logged(finetune_run.root / f"out/{d}/log.jsonl") for d in ("lora-one", "lora-two"))
    assert list(one) == list(two) == [1, 2] and all(abs(one[i] - two[i]) < 1e-5 for i in one)


def test_classifier_with_lora_trains_adapters_and_predicts_merged(classify_run):
    result = classify_run("--lora_rank=4", "--lora_targets=q,v", "--train_subset=32", "--epochs=2", "--lr=1e-3",
                          "--out_dir=out/lora")
    # adapters on q and v of both blocks (2 x 2 x 4 x (64 + 64)) and the new head in full (64 x 2 + 2)
    assert "2,178 of 3,335,106 parameters trainable (0.0653%; LoRA rank 4, alpha 16 on q,v)" in result.stdout
    ckpt = torch.load(classify_run.root / "out/lora/ckpt.pt", weights_only=True)
    assert ckpt["lora"]["targets"] == ["q", "v"] and "gpt.h.0.attn.c_attn.lora_A" in ckpt["model"]
    merged = load_classifier(ckpt)
    unmerged = load_classifier(ckpt, merge_lora=False)
    idx, lengths = torch.randint(0, 50257, (2, 12)), torch.tensor([12, 7])
    with torch.no_grad():
        assert (merged(idx, lengths)[0] - unmerged(idx, lengths)[0]).abs().max().item() <= 1e-5
    predicted = classify_run(f"--model={classify_run.root / 'out/lora/ckpt.pt'}", "--text=WINNER!! Claim your prize")
    assert predicted.stdout.split("\t")[0] in ("ham", "spam")
    torch.save({**ckpt, "lora": {**ckpt["lora"], "rank": 8}}, classify_run.root / "out/lora/wrong.pt")
    wrong = classify_run(f"--model={classify_run.root / 'out/lora/wrong.pt'}", "--text=hello", check=False)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "do not fit rank 8" in wrong.stderr
    both = classify_run("--lora_rank=4", "--trainable=all", check=False)
    assert both.returncode == 2 and "does not go with LoRA" in both.stderr


# ----------------------------------------------------------------------------- int8

def test_int8_weights_are_within_half_a_step_in_every_layer(tiny):
    gpt = load(tiny[1])
    originals = {n: m.weight.detach().clone() for n, m in gpt.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_int8(gpt)
    for name, w in originals.items():
        m = gpt.get_submodule(name)
        scale = m.scales.float()[:, None]
        error = (w - m.weight.float() * scale).abs()
        assert (error <= scale / 2 + 1e-7).all(), name  # round-to-nearest with the scale that is stored
        assert m.weight.abs().max() == 127  # each row's largest weight uses the whole range
    assert len(originals) == 2 * 4 + 1


def test_a_quantized_model_refuses_to_train(tiny):
    gpt = quantize_int8(load(tiny[1]))
    assert not gpt.training
    idx = torch.randint(0, 50257, (1, 10))
    with pytest.raises(RuntimeError, match="int8 weights cannot be trained"):
        gpt.train()(idx, idx)
    with pytest.raises(ValueError, match="merge the LoRA adapters"):
        quantize_int8(add_lora(load(tiny[1]), 4, 8))


# ----------------------------------------------------------------------------- sample.py

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def finetuned(tiny, tmp_path_factory):
    """A checkpoint as finetune.py writes it, carrying the Alpaca prompt template."""
    path = tmp_path_factory.mktemp("ft") / "ckpt.pt"
    ours = load(tiny[1])
    torch.save({"model": ours.state_dict(), "model_config": vars(ours.config), "config": {},
                "template": ALPACA_TEMPLATE}, path)
    return path


def sample(*args, stdin=None):
    """Run sample.py with --key=value args; returns the CompletedProcess (text, stdout and stderr apart)."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "sample.py", *args], cwd=HERE, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def greedy_ids(model, ids, n):
    """Our greedy continuation of ids (a list), stopped before the first end-of-text."""
    out = model.generate(torch.tensor([ids]), n, temperature=0, eos_id=EOT)[0, len(ids):].tolist()
    return out[:out.index(EOT)] if EOT in out else out


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


# ----------------------------------------------------------------------------- generation in model.py

def test_stream_yields_each_new_column_and_frees_the_cache_when_left_early(tiny):
    ours = load(tiny[1])
    names = set(ours.state_dict())
    use_kernel(ours, RowsLinear)
    assert any(isinstance(m, RowsLinear) for m in ours.modules())  # the split-rows float32 path is in use
    assert set(ours.state_dict()) == names and ours.lm_head.weight is ours.wte.weight  # same weights, still tied
    prompt = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(0))
    full = ours.generate(prompt, 12, temperature=0)
    steps = ours.generate_stream(prompt, 12, temperature=0)
    first = [next(steps) for _ in range(4)]
    assert all(col.shape == (2,) for col in first)
    assert torch.equal(torch.stack(first, 1), full[:, 6:10])
    steps.close()
    assert all(block.attn.kv_cache is None for block in ours.h)


def test_fast_decode_logits_equal_full_recompute(tiny):
    """Prefill, then one token at a time through the KV cache and RowsLinear (bmm over slices of the weights),
    gives the logits of recomputing everything with plain nn.Linear."""
    ours = load(tiny[1])
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours.lm_head(ours.hidden_states(idx))
        use_kernel(ours, RowsLinear)
        ours.setup_cache(3, 40)
        steps = [ours.next_logits(idx[:, :10], 0)] + [ours.next_logits(idx[:, t:t + 1], t) for t in range(10, 40)]
        ours.clear_cache()
    assert (torch.stack(steps, 1) - full[:, 9:]).abs().max().item() <= 1e-5


def test_decode_kernel_is_chosen_by_timing_steps_of_as_many_rows_as_asked(tiny):
    ours = load(tiny[1])
    kernel, timings = choose_decode_kernel(ours, rows=5)
    assert set(timings) == {"linear", "rows"} and all(0 < ms < float("inf") for ms in timings.values())
    assert kernel == "linear" or timings[kernel] < 0.97 * timings["linear"]  # never slower than nn.Linear
    assert isinstance(ours.lm_head, RowsLinear) == (kernel == "rows")
    assert choose_decode_kernel(ours, rows=5) == (kernel, timings)  # measured once per process
    # either kernel answers 5 rows at a time as plain nn.Linear does
    prompts = [list(range(1, 3 + i % 7)) for i in range(9)]
    answers = {}
    for make in (plain_linear, RowsLinear):
        use_kernel(ours, make)
        answers[make] = answer(ours, prompts, 10, batch_size=5)
    assert answers[plain_linear] == answers[RowsLinear]


def test_int8_weights_stay_close_to_float32(tiny):
    ours = load(tiny[1])
    idx = torch.randint(0, 50257, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = ours(idx)[0]
        q = quantize_int8(load(tiny[1]))
        assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * 2 + 1  # every Linear, lm_head too
        logits = q(idx)[0]
    assert ((logits - ref).norm() / ref.norm()).item() < 0.02
    prompt = idx[:1, :8]
    same = (q.generate(prompt, 30, temperature=0) == ours.generate(prompt, 30, temperature=0)).float().mean()
    assert same.item() >= 0.8


def test_compiled_decode_step_generates_the_same_tokens(tiny):
    pytest.importorskip("torch._inductor")
    ours, compiled = load(tiny[1]), load(tiny[1])
    compiled.compile_decode()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    idx = torch.tensor([[0] * (6 - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (6 - len(p)) + [True] * len(p) for p in prompts])
    for n in (10, 25):  # two lengths, one compiled graph
        assert torch.equal(compiled.generate(idx[:1], n, temperature=0), ours.generate(idx[:1], n, temperature=0))
    assert torch.equal(compiled.generate(idx, 20, temperature=0, valid=valid),
                       ours.generate(idx, 20, temperature=0, valid=valid))


def test_sampling_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(40_000, 1)  # 40,000 draws at once
    g = torch.Generator().manual_seed(0)

    def freq(**kwargs):
        return torch.bincount(sample_next(logits, generator=g, **kwargs), minlength=5) / len(logits)
    probs = logits[0].softmax(-1)
    assert (freq(temperature=1.0) - probs).abs().max() < 0.01
    assert (freq(temperature=0.5) - (logits[0] / 0.5).softmax(-1)).abs().max() < 0.01
    first_two = torch.tensor([probs[0], probs[1], 0, 0, 0]) / probs[:2].sum()
    assert (freq(temperature=1.0, top_k=2) - first_two).abs().max() < 0.01
    assert (freq(temperature=1.0, top_p=0.7) - first_two).abs().max() < 0.01  # 0.64 < 0.7 <= 0.64 + 0.24


def test_top_p_on_the_likeliest_candidates_equals_sorting_everything():
    def by_sorting(logits, top_p):  # the textbook way: sort the whole vocabulary
        probs, order = logits.softmax(-1).sort(descending=True)
        drop = (probs.cumsum(-1) - probs >= top_p).scatter(-1, order, probs.cumsum(-1) - probs >= top_p)
        return logits.masked_fill(drop, float("-inf"))
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0, 12.0):  # flat (the top 256 hold < top_p: all are sorted) to peaked
        logits = torch.randn(4, 50257, generator=g) * scale
        for top_p in (0.5, 0.9, 0.99):
            assert torch.equal(filter_logits(logits, top_p=top_p), by_sorting(logits, top_p))


# ----------------------------------------------------------------------------- streaming text

def test_stream_prints_whole_utf8_characters_only(enc):
    out = io.StringIO()
    text = TextStream(enc, out=out)
    shown = []
    for token in enc.encode_ordinary("a 🦙 and 日本語"):  # the llama is 3 tokens, each kanji 2
        text.add(token)
        shown.append(out.getvalue())
    text.finish()
    assert out.getvalue() == "a 🦙 and 日本語"
    assert all("\ufffd" not in s for s in shown)
    assert shown[0] == "a"  # printed at once, not at the end


def test_stream_holds_back_a_possible_stop_string_and_cuts_before_it(enc):
    out = io.StringIO()
    text = TextStream(enc, stops=["###"], out=out)
    shown = []
    for token in enc.encode_ordinary("one ## two ### three"):  # one, " ##", " two", " ###", " three"
        if text.add(token):
            break
        shown.append(out.getvalue())
    text.finish()
    assert shown == ["one", "one ", "one ## two"]  # "##" might have begun "###": held back until " two"
    assert out.getvalue() == "one ## two "


# ----------------------------------------------------------------------------- the command line

def test_greedy_text_equals_transformers_generate(tiny, enc):
    hf, folder = tiny
    ids = enc.encode_ordinary(PROMPT)
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=30, do_sample=False, pad_token_id=EOT, eos_token_id=None)[0, len(ids):].tolist()
    ref = ref[:ref.index(EOT)] if EOT in ref else ref
    out = ok(sample(f"--model={folder}", f"--prompt={PROMPT}", "--temperature=0", "--max_new_tokens=30"))
    assert out == PROMPT + enc.decode(ref) + "\n"


def test_generation_stops_at_end_of_text(tiny, tmp_path, enc):
    """A model whose token X is renamed <|endoftext|> (rows X and 50256 of wte swapped) computes exactly what
    the original does, so its greedy text is the original's up to where the original says X."""
    ours = load(tiny[1])
    prompt = "The meaning of life is"
    ids = enc.encode_ordinary(prompt)
    tokens = greedy_ids(ours, ids, 30)
    stop = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i] + ids)
    state = ours.state_dict()
    state["wte.weight"][[tokens[stop], EOT]] = state["wte.weight"][[EOT, tokens[stop]]]
    torch.save({"model": state, "model_config": vars(ours.config), "config": {}, "template": None},
               tmp_path / "ckpt.pt")
    out = ok(sample(f"--model={tmp_path / 'ckpt.pt'}", f"--prompt={prompt}", "--temperature=0",
                    "--max_new_tokens=30"))
    assert stop > 3 and out == prompt + enc.decode(tokens[:stop]) + "\n"


def test_batch_of_prompts_equals_each_prompt_alone(tiny, tmp_path, enc):
    ours = load(tiny[1])
    lines = ["The cat", "Once upon a time, in a land far away, there", "1, 2, 3,"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n\n")  # blank lines are no prompts
    batch = ok(sample(f"--model={tiny[1]}", f"--prompt=FILE:{tmp_path / 'prompts.txt'}", "--batch=True",
                      "--temperature=0", "--max_new_tokens=15"))
    alone = [line + enc.decode(greedy_ids(ours, enc.encode_ordinary(line), 15)) for line in lines]
    assert batch == "\n---------------\n".join(alone) + "\n"


def test_top_k_1_is_greedy_and_the_seed_fixes_the_text(tiny, enc):
    ours = load(tiny[1])
    args = (f"--model={tiny[1]}", f"--prompt={PROMPT}", "--max_new_tokens=20", "--temperature=1.0")
    greedy = PROMPT + enc.decode(greedy_ids(ours, enc.encode_ordinary(PROMPT), 20)) + "\n"
    assert ok(sample(*args, "--top_k=1")) == greedy
    a, b = (ok(sample(*args, "--seed=7", "--num_samples=2", "--top_p=1.0")) for _ in range(2))
    first, second = a.split("\n---------------\n")
    assert a == b and first != second and greedy not in (first + "\n", second)


def test_finetuned_checkpoint_wraps_the_prompt_and_prints_only_the_response(tiny, finetuned, enc):
    ours = load(tiny[1])
    instruction = "Give three tips for staying healthy."
    out = ok(sample(f"--model={finetuned}", f"--prompt={instruction}", "--temperature=0", "--max_new_tokens=20"))
    assert out == enc.decode(greedy_ids(ours, enc.encode_ordinary(format_prompt(instruction)), 20)) + "\n"
    wrapped = ok(sample(f"--model={finetuned}", "--prompt=Translate.", "--input=Bonjour", "--temperature=0",
                        "--max_new_tokens=20"))
    with_input = format_prompt("Translate.", "Bonjour", ALPACA_TEMPLATE)
    assert "### Input:\nBonjour" in with_input
    assert wrapped == enc.decode(greedy_ids(ours, enc.encode_ordinary(with_input), 20)) + "\n"
    plain = ok(sample(f"--model={finetuned}", f"--prompt={instruction}", "--template=none", "--temperature=0",
                      "--max_new_tokens=20"))
    assert plain == instruction + enc.decode(greedy_ids(ours, enc.encode_ordinary(instruction), 20)) + "\n"


def test_long_prompt_is_cut_from_the_left_with_a_warning(tiny, enc):
    ours = load(tiny[1])
    words = " ".join(f"word{i}" for i in range(200))  # ~400 tokens; the tiny context is 128
    result = sample(f"--model={tiny[1]}", f"--prompt={words}", "--temperature=0", "--max_new_tokens=20",
                    "--template=none")
    ids = enc.encode_ordinary(words)
    assert f"warning: the prompt is {len(ids)} tokens: only its last 108 are kept" in result.stderr
    assert ok(result) == words + enc.decode(greedy_ids(ours, ids[-108:], 20)) + "\n"


def test_empty_prompt_starts_from_end_of_text(tiny, enc):
    ours = load(tiny[1])
    assert ok(sample(f"--model={tiny[1]}", "--temperature=0", "--max_new_tokens=10")) == \
        enc.decode(greedy_ids(ours, [EOT], 10)) + "\n"


def test_bad_values_are_rejected_before_loading(tmp_path):
    result = sample("--temperature=-1", "--top_p=1.5", "--top_k=0", "--max_new_tokens=0", "--quantize=int4",
                    f"--prompt=FILE:{tmp_path / 'missing.txt'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for why in ["temperature=-1.0 must be 0", "top_p=1.5 must be in (0, 1]", "top_k=0 must be",
                "max_new_tokens=0 must be at least 1", "quantize='int4' must be one of none, int8",
                "missing.txt' does not exist"]:
        assert why in result.stderr
    assert "top_p=0.0 must be in (0, 1]" in sample("--top_p=0").stderr
    unknown = sample("--model=gpt3")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: model 'gpt3' is neither a GPT-2 name")


def test_a_prompt_file_that_is_not_utf8_and_a_broken_template_are_one_line(tiny, tmp_path):
    (tmp_path / "prompt.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    result = sample(f"--model={tiny[1]}", f"--prompt=FILE:{tmp_path / 'prompt.txt'}")
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr and result.stderr.count("\n") == 1
    ours = load(tiny[1])
    torch.save({"model": ours.state_dict(), "model_config": vars(ours.config), "template": {"prompt": "Q: {question}"}},
               tmp_path / "ckpt.pt")
    broken = sample(f"--model={tmp_path / 'ckpt.pt'}", "--prompt=Hi")
    assert broken.returncode == 2 and "its prompt template is not usable" in broken.stderr


def test_quantized_int8_runs_from_the_command_line(tiny):
    out = ok(sample(f"--model={tiny[1]}", f"--prompt={PROMPT}", "--quantize=int8", "--temperature=0",
                    "--max_new_tokens=10"))
    assert out.startswith(PROMPT) and len(out) > len(PROMPT) + 1


def test_chat_answers_each_line_and_forgets_on_reset(tiny, finetuned, enc):
    ours = load(tiny[1])
    first, second = "Name a color.", "Name a fruit."
    result = sample(f"--model={finetuned}", "--chat=True", "--temperature=0", "--max_new_tokens=12",
                    stdin=f"{first}\n{second}\n/reset\n{second}\n/quit\nnever read\n")
    answer = [enc.decode(greedy_ids(ours, enc.encode_ordinary(format_prompt(q)), 12)) + "\n" for q in (first, second)]
    history = enc.encode_ordinary(format_prompt(first)) + greedy_ids(ours, enc.encode_ordinary(format_prompt(first)), 12)
    in_context = enc.decode(greedy_ids(ours, history + [EOT] + enc.encode_ordinary(format_prompt(second)), 12)) + "\n"
    assert in_context != answer[1]  # the second question is answered knowing the first
    # each "> " is input()'s prompt; after /reset the question is answered as if it came first
    assert ok(result) == "> " + answer[0] + "> " + in_context + "> " + "> " + answer[1] + "> "
    assert "conversation forgotten" in result.stderr
    eof = sample(f"--model={finetuned}", "--chat=True", "--max_new_tokens=3", stdin=f"{first}\n")  # Ctrl-D
    assert ok(eof).count("> ") == 2


# ----------------------------------------------------------------------------- evaluate.py



# --- the metrics, against rouge-score and SQuAD v1.1's official script

def squad_normalize(s):
    """SQuAD v1.1's evaluate-v1.1.py normalize_answer, step by step as written there."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction, ground_truth):
    prediction_tokens, truth_tokens = squad_normalize(prediction).split(), squad_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision, recall = 1.0 * num_same / len(prediction_tokens), 1.0 * num_same / len(truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def perturbed(text, rng):
    """text changed the way a model's answer differs from a reference: words dropped, swapped, repeated,
    case and punctuation changed, articles added, or a different answer altogether."""
    words = text.split()
    how = rng.randrange(6)
    if how == 0 and words:
        words = [w for w in words if rng.random() > 0.3]
    elif how == 1 and len(words) > 1:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif how == 2:
        words = [w.upper() if rng.random() < 0.3 else w + rng.choice(["", ",", "!", "..."]) for w in words]
    elif how == 3:
        words = [rng.choice(["the", "a", "An"]) + " " + w if rng.random() < 0.3 else w for w in words]
    elif how == 4:
        words = words + words[:rng.randrange(len(words) + 1)]
    else:
        words = rng.sample(words, len(words))[:max(1, len(words) // 2)]
    return " ".join(words)


def made_up_pairs(n, rng):
    """Pairs written here: shared words, punctuation, articles, digits, accents, empty strings, repeats; a third
    unrelated, a third one text and a perturbed copy, a third the same words in other case and punctuation."""
    vocab = ["the", "a", "an", "The", "cat", "cats", "sat", "on", "mat", "mat.", "Paris", "paris!", "42", "4.2",
             "don't", "co-op", "naïve", "café", "über", "(yes)", "", "   ", "-", "Mat", "an apple", "A", "THE"]

    def text():
        return " ".join(rng.choice(vocab) for _ in range(rng.randrange(0, 25)))
    pairs = []
    for i in range(n):
        a = text()
        b = text() if i % 3 == 0 else perturbed(a, rng) if i % 3 == 1 else rng.choice([a.upper(), a + "!", f"({a})"])
        pairs.append((a, b))
    return pairs


def metric_pairs():
    rng = random.Random(0)
    pairs = made_up_pairs(300, rng)
    if os.environ.get("NANOFT_SHARED_DATA"):  # and real answers, where the real instruction data is at hand
        outputs = [r["output"] for r in json.loads((Path(os.environ["NANOFT_SHARED_DATA"]) / "instruction-data.json").read_text())]
        pairs += [(perturbed(out, rng), out) for out in rng.sample(outputs, 300)]
        pairs += [(a, b) for a, b in zip(rng.sample(outputs, 50), rng.sample(outputs, 50))]  # unrelated answers
    return pairs


def test_rouge_l_f1_and_exact_match_equal_rouge_score_and_squad():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer", reason="pip install -r requirements-dev.txt")
    scorer = rouge_score.RougeScorer(["rougeL"])
    pairs = metric_pairs()
    assert len(pairs) >= (650 if os.environ.get("NANOFT_SHARED_DATA") else 300)
    for prediction, reference in pairs:
        ours = metrics.answer_metrics(prediction, reference)
        assert abs(ours["rouge_l"] - scorer.score(reference, prediction)["rougeL"].fmeasure) <= 1e-6
        assert abs(ours["token_f1"] - squad_f1(prediction, reference)) <= 1e-6
        assert ours["exact_match"] == float(squad_normalize(prediction) == squad_normalize(reference))
    # the pairs are no trivial ones: the scores spread over (0, 1), and some are exact matches
    rouge = [metrics.rouge_l(p, r) for p, r in pairs]
    assert 0.1 < np.mean(rouge) < 0.9 and sum(metrics.exact_match(p, r) for p, r in pairs) >= 3


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_examples():
    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(5000)
    lo, hi = metrics.bootstrap_ci(small)
    assert lo < small.mean() < hi and metrics.bootstrap_ci(small) == [lo, hi]  # seeded
    lo2, hi2 = metrics.bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo) / 5  # ~1/sqrt(100) as wide
    # the loss per token: a ratio of sums, resampled by example
    nll, tokens = rng.random(200) * 30, rng.integers(5, 30, 200)
    lo, hi = metrics.bootstrap_ci(nll, tokens)
    assert lo < nll.sum() / tokens.sum() < hi
    assert metrics.mean_ci([3.0]) == {"mean": 3.0, "ci95": None, "n": 1}


# --- a judge on loopback: an Ollama-shaped stub, and nanoFT's own serve.py for OpenAI's /v1/chat/completions

def stub_verdict(prompt):
    """(first reply, reply when asked again, the value the judge client must keep, whether it asks again) of
    the stub judge for a prompt:
    a number (a letter for a pair) fixed by the prompt; a quarter of first replies are no number, and half of
    those stay wrong when asked again (unparsable)."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    good = "AB"[h % 2] if "Response A:" in prompt else str(h % 101)
    first = good if h % 4 else "Well, it depends."
    again = good if (h // 4) % 2 else "I cannot say."
    kept = good if h % 4 or (h // 4) % 2 else None
    return first, again, (int(kept) if kept and kept.isdigit() else kept), h % 4 == 0


class JudgeStub(http.server.ThreadingHTTPServer):
    """A judge on 127.0.0.1 that speaks Ollama's /api/tags and /api/chat (Ollama itself cannot run here),
    answering as stub_verdict says; it can fail, be slow, and counts what it gets."""

    def __init__(self, models=("judge",)):
        super().__init__(("127.0.0.1", 0), JudgeStubHandler)
        self.models, self.chats, self.lock = list(models), [], threading.Lock()
        self.fail_next, self.delay, self.inflight, self.most_inflight = 0, 0.0, 0, 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class JudgeStubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        models = self.server.models
        if self.path == "/api/tags":
            return self.send_json(200, {"models": [{"name": f"{m}:latest", "model": f"{m}:latest"} for m in models]})
        self.send_json(404, {"error": "not found"})

    def do_POST(self):
        stub = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with stub.lock:
            stub.chats.append((self.path, body, self.headers.get("Authorization")))
            stub.inflight += 1
            stub.most_inflight = max(stub.most_inflight, stub.inflight)
            failing = stub.fail_next > 0
            stub.fail_next -= failing
        try:
            time.sleep(stub.delay)
            if failing:
                return self.send_json(503, {"error": "overloaded"})
            if body["model"].removesuffix(":latest") not in stub.models:
                return self.send_json(404, {"error": f"model \"{body['model']}\" not found, try pulling it first"})
            first, again, _, _ = stub_verdict(body["messages"][0]["content"])
            reply = first if len(body["messages"]) == 1 else again
            self.send_json(200, {"model": body["model"], "message": {"role": "assistant", "content": reply},
                                 "done": True})
        finally:
            with stub.lock:
                stub.inflight -= 1


@pytest.fixture()
def judge_stub():
    stub = JudgeStub()
    threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield stub
    stub.shutdown()
    stub.server_close()


def score_jobs(n):
    return [jg.score_job(f"Name thing {i}.", "", f"Thing {i}.", f"It is thing {i * 7}.") for i in range(n)]


def test_judge_scores_reasks_once_and_counts_unparsable(judge_stub, tmp_path):
    judge = jg.Judge("ollama:judge", jg.Cache(str(tmp_path / "cache.jsonl")), url=judge_stub.url)
    judge.check()
    jobs = score_jobs(40)
    verdicts = dict(judge.run(jobs, concurrency=4))
    expected = [stub_verdict(job.prompt) for job in jobs]
    assert [verdicts[i].value for i in range(40)] == [kept for _, _, kept, _ in expected]
    assert [verdicts[i].reasked for i in range(40)] == [reasked for *_, reasked in expected]
    assert any(v.value is None for v in verdicts.values()) and any(v.reasked and v.value for v in verdicts.values())
    # the book's request: the prompt alone, greedy and seeded; a re-ask carries the first reply and a reminder
    path, body, _ = judge_stub.chats[0]
    assert path == "/api/chat" and body["stream"] is False and body["options"]["temperature"] == 0
    assert body["messages"][0]["content"].startswith("Given the input `Below is an instruction that describes a task.")
    assert body["messages"][0]["content"].endswith("where 100 is the best score. Respond with the integer number only.")
    reasks = [b["messages"] for _, b, _ in judge_stub.chats if len(b["messages"]) == 3]
    assert len(reasks) == sum(reasked for *_, reasked in expected)
    assert reasks[0][1]["role"] == "assistant" and "integer" in reasks[0][2]["content"]
    assert 1 < judge_stub.most_inflight <= 4


def test_judge_cache_makes_a_rerun_free_and_resumes_after_a_torn_line(judge_stub, tmp_path):
    path = tmp_path / "cache.jsonl"
    jobs = score_jobs(12)
    judge = jg.Judge("ollama:judge", jg.Cache(str(path)), url=judge_stub.url)
    first = {i: v.value for i, v in judge.run(jobs, 3)}
    asked = len(judge_stub.chats)
    again = jg.Judge("ollama:judge", jg.Cache(str(path)), url=judge_stub.url)
    assert {i: v.value for i, v in again.run(jobs, 3)} == first and len(judge_stub.chats) == asked
    # a run killed mid-write leaves a torn last line: skipped, and the next reply starts a line of its own
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]) + lines[5][:20])
    cache = jg.Cache(str(path))
    assert len(cache.replies) == 5 and cache.unreadable == 1
    resumed = jg.Judge("ollama:judge", cache, url=judge_stub.url)
    assert {i: v.value for i, v in resumed.run(jobs, 3)} == first
    assert len(judge_stub.chats) == asked + len(lines) - 5  # only what was lost is asked again
    assert len(jg.Cache(str(path)).replies) == len(lines)
    longer, before = jg.Judge("ollama:judge", jg.Cache(str(path)), url=judge_stub.url, max_tokens=64), len(judge_stub.chats)
    list(longer.run(jobs[:2], 2))  # another reply length is another request: not answered from the cache
    assert len(judge_stub.chats) - before >= 2 and judge_stub.chats[-1][1]["options"]["num_predict"] == 64


def test_judge_retries_with_backoff_and_times_out(judge_stub, tmp_path, monkeypatch):
    monkeypatch.setattr(jg, "BACKOFF", 0.01)
    judge = jg.Judge("ollama:judge", jg.Cache(str(tmp_path / "c.jsonl")), url=judge_stub.url, retries=3)
    judge_stub.fail_next = 2  # two 503s, then an answer
    job = score_jobs(1)[0]
    assert judge.judge(job).value == stub_verdict(job.prompt)[2]
    judge_stub.fail_next = 10
    with pytest.raises(jg.JudgeError, match=r"did not answer after 3 attempts \(last: 503 Service Unavailable: "
                                            r"overloaded\).*run again"):
        judge.judge(score_jobs(2)[1])
    judge_stub.fail_next, judge_stub.delay = 0, 1.0
    slow = jg.Judge("ollama:judge", jg.Cache(str(tmp_path / "d.jsonl")), url=judge_stub.url, retries=2, timeout=0.2)
    t0 = time.time()
    with pytest.raises(jg.JudgeError, match=r"after 2 attempts \(last: ReadTimeout after 0.2s\)"):
        slow.judge(score_jobs(3)[2])
    assert time.time() - t0 < 1.5


def test_judge_speaks_openai_chat_completions_to_serve_py(tiny, tmp_path):
    """The client against nanoFT's own serve.py on loopback, serving the tiny random model as 'judge': its replies
    are nonsense, so answers are asked again and stay unparsable; every reply must be what the official OpenAI
    client gets for the same request, and the cache must answer alone once the server is gone."""
    server = start_server(tiny[1], name="judge", api_key="sekrit", max_batch=8)
    try:
        judge = jg.Judge("openai:judge", jg.Cache(str(tmp_path / "c.jsonl")), url=server.url + "/v1", key="sekrit",
                         max_tokens=5)
        judge.check()
        jobs = score_jobs(6)
        verdicts = dict(judge.run(jobs, 3))
        client = openai_client(server, key="sekrit")

        def reply(messages):
            return client.chat.completions.create(model="judge", messages=messages, max_tokens=5, temperature=0,
                                                  seed=123).choices[0].message.content
        for i, job in enumerate(jobs):
            messages = [{"role": "user", "content": job.prompt}]
            first = reply(messages)
            assert verdicts[i].reasked == (jg.parse_score(first) is None)
            if verdicts[i].reasked:
                first = reply(messages + [{"role": "assistant", "content": first},
                                          {"role": "user", "content": job.reminder}])
            assert (verdicts[i].text, verdicts[i].value) == (first, jg.parse_score(first))
        assert any(v.reasked for v in verdicts.values())  # a random model gives no integers
        for spec, key, why in (("openai:gpt-9", "sekrit", r"does not serve a model 'gpt-9'; it serves judge"),
                               ("openai:judge", None, r"refused the request \(401 .*judge_key_env")):
            with pytest.raises(jg.JudgeError, match=why):
                jg.Judge(spec, jg.Cache(str(tmp_path / "c.jsonl")), url=server.url, key=key).check()
        unchecked = jg.Judge("openai:gpt-9", jg.Cache(str(tmp_path / "c.jsonl")), url=server.url, key="sekrit")
        with pytest.raises(jg.JudgeError, match=r"has no model 'gpt-9' \(400: model \"gpt-9\" is not served here"):
            unchecked.judge(jobs[0])
    finally:
        stop_server(server)
    offline = jg.Judge("openai:judge", jg.Cache(str(tmp_path / "c.jsonl")), url=server.url, key="sekrit", max_tokens=5)
    cached = {i: (v.value, v.text) for i, v in offline.run(jobs, 3)}
    assert cached == {i: (v.value, v.text) for i, v in verdicts.items()}


def test_parsing_takes_only_what_the_prompt_asks_for():
    assert [jg.parse_score(t) for t in ["85", " 7\n", "100.", "0", "101", "85/100", "Score: 85", "8 5", ""]] == \
        [85, 7, 100, 0, None, None, None, None, None]
    choices = [jg.parse_choice(t) for t in ["A", " B.", "(A)", "a", "AB", "Response A"]]
    assert choices == ["A", "B", "A", None, None, None]
    assert jg.ollama_url("0.0.0.0") == "http://0.0.0.0:11434" and jg.ollama_url("http://h:1234/") == "http://h:1234"
    assert jg.ollama_url("https://ollama.example.com") == "https://ollama.example.com:443"  # as Ollama reads it
    assert jg.ollama_url("::1") == "http://[::1]:11434" and jg.ollama_url("h/api/x/") == "http://h:11434/api/x"
    assert jg.ollama_url("http://[::1]:8080") == "http://[::1]:8080" and jg.ollama_url("") == "http://127.0.0.1:11434"


# --- HellaSwag, against straightforward transformers implementations of both ways to score it

HELLASWAG = [  # the official file's format; WikiHow's markers, capitals in ctx_b, an accent, an empty ctx_b
    {"ind": 4, "activity_label": "Rock climbing", "ctx_a": "A woman is climbing a wall outdoors.", "ctx_b": "she",
     "label": 1, "endings": ["eats a sandwich on the couch.", "reaches for the next hold and pulls herself up.",
                             "is shown swimming in a pool.", "puts the rope in a washing machine."]},
    {"ind": 12, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant tulips [title] Pick a sunny "
     "spot. [step] Tulips need six hours of sun a day.", "ctx_b": "", "label": 0,
     "endings": ["[title] Dig holes eight inches deep. [step] Put each bulb in pointy side up.",
                 "[title] Paint the bulbs blue. [step] Blue bulbs grow faster.", "You can eat tulips raw.",
                 "[substeps] Ask the bulbs what they want."]},
    {"ind": 31, "activity_label": "Playing harmonica", "ctx_a": "A man holds a harmonica to his mouth.",
     "ctx_b": "then the NASA engineer", "label": 2,
     "endings": ["flies to the moon.", "ate a café crème.", "plays a short blues tune.", "closes the piano lid."]},
    {"ind": 40, "activity_label": "Food and Entertaining", "ctx_a": "[header] How to make tea [title] Boil water.",
     "ctx_b": "", "label": 3, "endings": ["[step] Drink the kettle.", "[step] Freeze it.", "[step] Plant it.",
                                          "[step] Pour it over the tea leaves and wait three minutes."]},
    {"ind": 57, "activity_label": "Shaving", "ctx_a": "A man lathers his face with shaving cream.", "ctx_b": "he",
     "label": 0, "endings": ["shaves carefully with a razor.", "sings.", "opens   the fridge.",
                             "jumps [sic] high."]},
    {"ind": 63, "activity_label": "Home and Garden", "ctx_b": "", "label": 2,  # a query that ends in a space
     "ctx_a": "[header] How to fold a shirt [title] Lay it flat. [step]",
     "endings": ["Fold the sleeves in.", "Iron the café's crème brûlée.", "Fold it in half.", "日本語で畳む。"]},
]
for _ex in HELLASWAG:
    _ex.update(ctx=(_ex["ctx_a"] + " " + _ex["ctx_b"]).strip(), split="val", split_type="indomain",
               source_id=f"test~{_ex['ind']}")


def harness_text(text):
    """lm-evaluation-harness's hellaswag preprocess, in its order: strip, ' [title]' -> '. ', brackets out,
    double spaces single."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def reference_logprob(hf, context_ids, ending_ids):
    with torch.no_grad():
        logits = hf(torch.tensor([context_ids + ending_ids])).logits[0, :-1]
    logp = torch.log_softmax(logits.double(), -1)[torch.arange(len(context_ids) - 1, logits.size(0)),
                                                   torch.tensor(ending_ids)]
    return logp.sum().item()


def harness_reference(hf, ex, enc):
    """The harness's request for one example: context = its query, continuation = ' ' + choice (the context's
    trailing spaces moved to the front of the continuation), the pair encoded whole and split after the
    context's own tokens; acc_norm divides by len(choice)."""
    query = harness_text(ex["activity_label"] + ": " + ex["ctx_a"] + " " + ex["ctx_b"].capitalize())
    choices = [harness_text(e) for e in ex["endings"]]
    context, spaces = query.rstrip(), query[len(query.rstrip()):]
    ctx_ids = enc.encode(context)
    lls = [reference_logprob(hf, ctx_ids, enc.encode(context + spaces + " " + c)[len(ctx_ids):]) for c in choices]
    lengths = [len(c) for c in choices]
    return lls, int(np.argmax(lls)), int(np.argmax(np.array(lls) / lengths)), lengths


def completion_reference(hf, ex, enc):
    """build-nanogpt's hellaswag.py: the 4 rows padded into one batch, cross-entropy per position, masked to the
    ending; acc from the summed loss, acc_norm from the mean."""
    ctx_ids = enc.encode(ex["ctx"])
    rows = [ctx_ids + enc.encode(" " + e) for e in ex["endings"]]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[0] * len(ctx_ids) + [1] * (len(r) - len(ctx_ids)) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        logits = hf(tokens).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                               reduction="none").view(4, -1)
    sum_loss = (losses * mask[:, 1:]).sum(1)
    avg_loss = sum_loss / mask[:, 1:].sum(1)
    return (-sum_loss).tolist(), sum_loss.argmin().item(), avg_loss.argmin().item(), mask[:, 1:].sum(1).tolist()


@pytest.mark.parametrize("style", ["harness", "completion"])
def test_hellaswag_scores_equal_a_transformers_implementation(tiny, enc, style, tmp_path):
    hf, folder = tiny
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in HELLASWAG))
    examples = hs.load_hellaswag(str(path), style=style)
    ours = list(hs.score(load(folder), examples, style, batch_size=2))  # 8 rows of different lengths a batch
    reference = harness_reference if style == "harness" else completion_reference
    for ex, result in zip(HELLASWAG, ours):
        lls, pred, pred_norm, norm_by = reference(hf, ex, enc)  # norm_by: characters (harness) or tokens
        assert np.allclose(result["logprobs"], lls, atol=1e-4, rtol=0)
        assert (result["pred"], result["pred_norm"], result["label"]) == (pred, pred_norm, ex["label"])
        assert result["norm_by"] == norm_by
    assert hs.accuracy(ours)["n"] == len(HELLASWAG)


def test_hellaswag_text_is_prepared_as_the_harness_prepares_it():
    context, endings = hs.harness_request(HELLASWAG[1])
    assert context == "Home and Garden: How to plant tulips. Pick a sunny spot. Tulips need six hours of sun a day."
    # a marker at the very start leaves a space, so the harness scores "  Dig..." (two spaces): as it does
    assert endings[0] == " Dig holes eight inches deep. Put each bulb in pointy side up."
    assert endings[3] == " Ask the bulbs what they want."
    harmonica = "Playing harmonica: A man holds a harmonica to his mouth. Then the nasa engineer"  # capitalize()
    assert hs.harness_request(HELLASWAG[2])[0] == harmonica


@pytest.mark.parametrize("line, why", [
    ("not json", "line 2 is not JSON"),
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', "no 'endings' list of 4 strings"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"]}', "label None, not 0-3"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', "no 'ctx' string"),
    ('[1, 2]', "is not a JSON object"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 2}', "no activity_label/ctx_a/ctx_b strings, which the "
                                                                  "harness style needs"),
])
def test_a_file_that_is_not_hellaswag_is_refused_and_not_kept(server, tmp_path, line, why):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(HELLASWAG[0]) + "\n" + line + "\n")
    url = server(path, name=f"bad-{abs(hash(line))}.jsonl")
    with pytest.raises(ValueError, match=re.escape(why)):
        hs.load_hellaswag(url, tmp_path / "cache", "harness")
    assert list((tmp_path / "cache" / "hellaswag").iterdir()) == []  # deleted: the next run downloads afresh


# --- evaluate.py from the command line

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, server):
    """A folder with tiny GPT-2s (context 256), an instruction dataset written here, finetune.py's checkpoint
    of one step on it with its test_responses.json (float32, 8 tokens), a HellaSwag file served on loopback,
    and run(*args, env=...) that runs evaluate.py there."""
    root = tmp_path_factory.mktemp("evaluate")
    reference_model(n_positions=256).save_pretrained(root / "tiny")
    reference_model(seed=1, n_positions=256).save_pretrained(root / "other")  # a baseline that answers otherwise
    records = [{"instruction": f"What color is item {i}?", "input": f"Item {i} is in box {i % 5}." if i % 3 else "",
                "output": f"Item {i} is {COLORS[i % 7]}, like {COLORS[(i * 3) % 7]} things."} for i in range(60)]
    write_json(root / "colors.json", records)
    (root / "hellaswag_val.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in HELLASWAG))
    env = {**os.environ, "NANOFT_CACHE": str(root / "cache"), "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1"}
    trained = subprocess.run([sys.executable, str(HERE / "finetune.py"), f"--model={root / 'tiny'}",
                              f"--dataset={root / 'colors.json'}", "--max_iters=1", "--eval_interval=1", "--lr=1e-6",
                              "--eval_prompts=0", "--max_new_tokens=8", "--dtype=float32", "--out_dir=out"],
                             cwd=root, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr

    def run(*args, check=True, **extra_env):
        result = subprocess.run([sys.executable, str(HERE / "evaluate.py"), *args], cwd=root,
                                env={**env, **extra_env}, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, result.stderr
        return result
    run.root, run.finetune_output, run.hellaswag_url = root, trained.stdout, server(root / "hellaswag_val.jsonl")
    return run


def test_bench_times_the_first_rounds_evaluation_against_todays_and_compares_results(eval_run):
    # bench.py --what=eval: val and test loss, and the test answers, as the first round made them and as now;
    # greedy answers, so in float32 the two ways give the same ones; the losses on the responses only, as
    # finetune.py --mask_prompt=True scores them
    def bench(*args):
        return subprocess.run([sys.executable, str(HERE / "bench.py"), "--what=eval", *args], cwd=eval_run.root,
                              capture_output=True, text=True, timeout=300)
    data = eval_run.root / "data" / "colors"
    result = bench(f"--eval_model={eval_run.root / 'tiny'}", f"--eval_data={data}", "--eval_tokens=6",
                   "--eval_mask_prompt=True")
    assert result.returncode == 0, result.stderr
    assert "losses on the responses" in result.stdout.splitlines()[0]
    assert result.stdout.count("losses now: ") == 2  # how the head's pieces were sized, per precision
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in result.stdout.splitlines()
            if line.startswith(("  fp32 ", "  bf16 "))}
    assert set(rows) == {(p, split, what) for p in ("fp32", "bf16") for split, what in
                         (("val", "loss"), ("test", "loss"), ("test", "answers"))}, result.stdout
    n = len(load_records(data, "test"))
    assert " ".join(rows["fp32", "test", "answers"]).endswith(f"{n}/{n} answers the same")
    for p, split in (("fp32", "val"), ("fp32", "test"), ("bf16", "val"), ("bf16", "test")):
        batch_means, per_token = float(rows[p, split, "loss"][3]), float(rows[p, split, "loss"][9])
        assert 0 < per_token < 20 and abs(batch_means - per_token) < 0.1 * per_token  # two means of one loss
    result = bench(f"--eval_model={eval_run.root / 'tiny'}", "--eval_data=nowhere")
    assert result.returncode != 0 and "nowhere is not a prepared dataset" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def evaluate_here(eval_run, monkeypatch, capsys, *args, **env):
    """evaluate.py's main run in this process, as its command line runs it, in eval_run's folder: (exit status,
    stdout, stderr). Quicker than a new process, which spends seconds importing torch."""
    monkeypatch.chdir(eval_run.root)
    for key, value in {"NANOFT_CACHE": str(eval_run.root / "cache"), **env}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    try:
        ev.main(configure(dict(vars(ev)), list(args)))
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_finetune_says_how_to_evaluate_and_records_which_checkpoint_answered(eval_run):
    root = eval_run.root
    assert (f"evaluate it: python evaluate.py --model=out/ckpt.pt --baseline={root / 'tiny'} --max_new_tokens=8 "
            f"--out_dir=out/eval") in eval_run.finetune_output
    info = json.loads((root / "out" / "test_responses.meta.json").read_text())
    assert info["sha256"] == hashlib.sha256((root / "out" / "ckpt.pt").read_bytes()).hexdigest()
    assert (info["checkpoint"], info["iter_num"], info["max_new_tokens"]) == ("ckpt.pt", 1, 8)


def test_evaluate_reports_model_and_baseline_with_judge_and_hellaswag(eval_run, monkeypatch, capsys):
    root, stub = eval_run.root, JudgeStub()
    threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    args = ["--model=out/ckpt.pt", f"--baseline={root / 'other'}", "--max_new_tokens=8", "--judge=ollama:judge",
            "--judge_mode=both", "--hellaswag=True", f"--hellaswag_url={eval_run.hellaswag_url}", "--batch_size=4"]
    result = eval_run(*args, OLLAMA_HOST=stub.url)
    assert "reusing the answers in out/test_responses.json (iteration 1" in result.stdout
    for phase in ("test loss", "answering", "HellaSwag (harness)", "out/ckpt.pt: judge ollama:judge",
                  "other: judge ollama:judge", "model vs baseline: judge ollama:judge"):
        assert re.search(re.escape(phase) + r": [\d,]+/[\d,]+ \w+ \(100%\) .*done in", result.stderr), phase
    report = json.loads((root / "eval" / "report.json").read_text())
    ours, base = report["models"]
    assert ours["answers"]["answers_from"] == "test_responses.json" and base["answers"]["answers_from"] == "generated"
    assert report["settings"]["judge"] == "ollama:judge" and ours["hellaswag"]["n"] == len(HELLASWAG)
    records = read_jsonl(root / "data" / "colors" / "test.jsonl")
    answers = read_jsonl(root / "eval" / "answers.jsonl")
    saved = json.loads((root / "out" / "test_responses.json").read_text())
    assert [a["model"]["answer"] for a in answers] == [s["model_response"] for s in saved]
    assert any(a["model"]["answer"] != a["baseline"]["answer"] for a in answers)  # a mix-up would show
    # every score is the stub's verdict on the book's prompt for that answer (0 for an empty answer, unasked)
    for side, summary in (("model", ours), ("baseline", base)):
        expected = [stub_verdict(jg.score_job(r["instruction"], r["input"], r["output"], a[side]["answer"]).prompt)[2]
                    if a[side]["answer"] else 0 for r, a in zip(records, answers)]
        assert [a[side]["judge"] for a in answers] == expected
        judged = summary["answers"]["judge"]
        assert judged["unparsable"] == expected.count(None) and judged["n"] == len(expected) - expected.count(None)
        assert abs(judged["mean"] - np.mean([e for e in expected if e is not None])) < 1e-9
    for r, a in zip(records, answers):  # pairwise: the order is recorded, the winner follows from it
        first, second = (a["model"], a["baseline"]) if a["pairwise"]["A"] == "model" else (a["baseline"], a["model"])
        choice = stub_verdict(jg.pair_job(r["instruction"], r["input"], r["output"], first["answer"],
                                          second["answer"]).prompt)[2]
        assert a["pairwise"]["choice"] == choice
        assert a["pairwise"]["winner"] == (None if choice is None else a["pairwise"]["A"] if choice == "A" else
                                           {"model": "baseline", "baseline": "model"}[a["pairwise"]["A"]])
    assert {a["pairwise"]["A"] for a in answers} == {"model", "baseline"}  # both orders occur
    md = (root / "eval" / "report.md").read_text()
    assert f"| metric | `out/ckpt.pt` | `{root / 'other'}` |" in md and "| HellaSwag acc_norm |" in md
    assert "## The five answers where the judge's scores of the model and the baseline differ most" in md
    # the same command again, with overwrite: every judgment from the cache, the same numbers
    asked = len(stub.chats)
    status, _, err = evaluate_here(eval_run, monkeypatch, capsys, *args, OLLAMA_HOST=stub.url)
    assert status == 2 and err == "error: eval/report.json is an earlier report: give another --out_dir, or " \
                                  "--overwrite=True to replace it\n"
    status, _, err = evaluate_here(eval_run, monkeypatch, capsys, *args, "--overwrite=True", OLLAMA_HOST=stub.url)
    assert status == 0 and len(stub.chats) == asked, err
    again = json.loads((root / "eval" / "report.json").read_text())
    assert again["models"] == report["models"] and again["pairwise"] == report["pairwise"]
    assert (root / "eval" / "hellaswag.jsonl").exists()  # and once without HellaSwag: the old file goes
    status, _, err = evaluate_here(eval_run, monkeypatch, capsys, *args, "--hellaswag=False", "--overwrite=True",
                                   OLLAMA_HOST=stub.url)
    assert status == 0 and not (root / "eval" / "hellaswag.jsonl").exists(), err
    stub.shutdown()
    stub.server_close()


def test_evaluate_loss_counts_response_tokens_as_transformers_does(eval_run):
    root = eval_run.root
    hf = GPT2LMHeadModel.from_pretrained(root / "other").eval()
    split = Split(root / "data" / "colors", "test")
    nll, counts = ev.response_losses(load(root / "other"), split, list(range(len(split))), 4)
    tokens, prompt_len = split_examples(root / "data" / "colors", "test")
    for total, count, ids, n in zip(nll, counts, tokens, prompt_len):
        labels = torch.tensor([ids])
        labels[0, :n] = -100  # the prompt carries no loss; the response and its <|endoftext|> do
        with torch.no_grad():
            loss = hf(torch.tensor([ids]), labels=labels).loss.item()
        assert count == len(ids) - n and abs(total / count - loss) < 1e-4


def test_evaluate_regenerates_what_finetune_answered(eval_run, monkeypatch, capsys):
    root = eval_run.root
    split = Split(root / "data" / "colors", "test")
    ours = ev.generate_answers(load(root / "out" / "ckpt.pt"), split, list(range(len(split))), 8,
                               ev.Progress("answering", len(split)))
    assert ours == [s["model_response"] for s in json.loads((root / "out" / "test_responses.json").read_text())]
    status, _, err = evaluate_here(eval_run, monkeypatch, capsys, "--model=out/ckpt.pt", "--max_new_tokens=4",
                                   "--limit=2", "--out_dir=eval-short")
    assert status == 0 and "not reusing out/test_responses.json: it has max_new_tokens=8 (not 4)" in err
    report = json.loads((root / "eval-short" / "report.json").read_text())
    assert report["models"][0]["answers"]["n"] == 2 and report["models"][0]["answers"]["answers_from"] == "generated"
    # the answers belong to the file with the recorded sha256, whatever its name; a changed file gets its own
    shutil.copy(root / "out" / "ckpt.pt", root / "out" / "same.pt")
    ckpt = torch.load(root / "out" / "ckpt.pt", weights_only=True)
    ckpt["model"]["ln_f.bias"] += 1e-3
    torch.save(ckpt, root / "out" / "changed.pt")
    for name, said in (("same.pt", "reusing the answers in out/test_responses.json (iteration 1"),
                       ("changed.pt", "not reusing out/test_responses.json: its answers are ckpt.pt's at iteration 1, "
                                      "not this file's")):
        status, out, err = evaluate_here(eval_run, monkeypatch, capsys, f"--model=out/{name}", "--max_new_tokens=8",
                                         "--limit=1", f"--out_dir=eval-{name}")
        assert status == 0 and said in out + err


def test_evaluate_refuses_bad_input_in_one_line(eval_run, judge_stub, monkeypatch, capsys):
    root = eval_run.root
    (root / "notes.txt").write_text("Plain text has no reference answers.\n" * 50)
    gpt = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.save({"kind": "classifier", "labels": ["ham", "spam"], "model": gpt.state_dict(),
                "model_config": vars(gpt.config)}, root / "classifier.pt")
    port, served = free_port(), start_server(root / "tiny", name="judge")  # serve.py as an OpenAI-compatible judge
    for args, env, message in [
        (["--judge=ollama:llama3.1"], {"OLLAMA_HOST": f"127.0.0.1:{port}"},
         f"cannot reach the judge at http://127.0.0.1:{port} (ConnectionError): start Ollama with `ollama serve`"),
        (["--judge=ollama:llama3.1"], {"OLLAMA_HOST": judge_stub.url},
         f"Ollama at {judge_stub.url} has no model 'llama3.1': run `ollama pull llama3.1` (it has judge:latest)"),
        (["--judge=openai:gpt-9", f"--judge_url={served.url}/v1"], {},
         f"the judge at {served.url} does not serve a model 'gpt-9'; it serves judge: give --judge=openai:judge"),
        ([f"--model={root / 'tiny'}", "--dataset=notes.txt"], {},
         "dataset 'notes.txt' has no reference answers (text data)"),
        ([f"--model={root / 'tiny'}"], {}, "does not say what it was trained on"),
        (["--model=classifier.pt"], {},
         "is a text classifier (ham, spam) written by classify.py, not a language model"),
        (["--judge=llama3", "--judge_mode=pairwise", "--answers=False"], {},
         "judge='llama3' must be ollama:MODEL (e.g. ollama:llama3.1) or openai:MODEL; the judge scores the test "
         "split's answers: it needs answers=True; judge_mode=pairwise compares the model with the baseline: give "
         "--baseline; answers=False and hellaswag=False: nothing to evaluate"),
    ]:
        status, _, err = evaluate_here(eval_run, monkeypatch, capsys, "--model=out/ckpt.pt", *args,
                                       f"--out_dir=bad-{port}", **env)
        last = err.splitlines()[-1]
        assert status == 2 and last.startswith("error: ") and message in last, err
    stop_server(served)
    assert not (root / f"bad-{port}").exists()
    # and from the command line: one line on stderr, nothing else
    result = eval_run("--model=classifier.pt", "--out_dir=bad-cli", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is a text classifier" in result.stderr


def test_evaluate_help_explains_every_setting(capsys):
    code, out = run_configure(dict(vars(ev)), ["--help"], capsys)
    settings = [line for line in out.splitlines() if line.startswith("  --")]
    assert code == 0 and len(settings) == len(config_keys(vars(ev))) > 20
    for line in settings:  # --key = default  # the comment at the setting's definition
        default, _, comment = line.strip().partition(" = ")[2].partition("  # ")
        assert default and len(comment) > 8, line


# ----------------------------------------------------------------------------- serve.py




def start_server(model, **settings):
    """serve.py's server for model, listening on a free 127.0.0.1 port and serving from a thread of this process;
    server.url is its address. Settings as on the command line (max_batch=1, api_key=...)."""
    import serve
    c = SimpleNamespace(**{**config_keys(vars(serve)), "model": str(model), "port": 0, **settings})
    server = serve.make_server(c)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server


def stop_server(server):
    server.shutdown()
    server.stop(cancel=True)


@pytest.fixture(scope="module")
def api(finetuned):
    """The tiny model behind serve.py, from a checkpoint that carries the Alpaca template (so chats use it)."""
    server = start_server(finetuned, max_batch=8, max_queue=16)
    yield server
    stop_server(server)


def openai_client(server, key="none"):
    openai = pytest.importorskip("openai", reason="the official OpenAI client: pip install -r requirements-dev.txt")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def raw_request(server, path, body=None, headers=None, method=None):
    """(status, JSON body) of one plain HTTP request; body: a dict (sent as JSON) or bytes."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method or ("GET" if body is None else "POST"), path, body=data, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    assert b"Traceback" not in raw
    return response.status, json.loads(raw)


def wait_until(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def streamed_pieces(enc, tokens):
    """What sample.py's TextStream prints for each token in turn (whole UTF-8 characters), empty ones left out."""
    out = io.StringIO()
    text, pieces = TextStream(enc, out=out), []
    for token in tokens:
        before = out.getvalue()
        text.add(token)
        pieces.append(out.getvalue()[len(before):])
    before = out.getvalue()
    text.finish()
    pieces[-1] += out.getvalue()[len(before):]
    return [p for p in pieces if p]


def batch_sizes(server, monkeypatch):
    """Record, at every step of server's engine, how many rows it generates together and how many were already
    running when rows joined them."""
    seen = {"step": [], "join": []}
    engine = server.engine
    step, join = engine.step, engine.join

    def counted_step():
        seen["step"].append(len(engine.rows))
        step()

    def counted_join(rows):
        seen["join"].append(len(engine.rows))
        join(rows)
    monkeypatch.setattr(engine, "step", counted_step)
    monkeypatch.setattr(engine, "join", counted_join)
    return seen


def test_serve_completes_like_model_generate_streamed_or_not(api, tiny, enc):
    ours = load(tiny[1])
    client = openai_client(api)
    assert [m.id for m in client.models.list()] == [api.model_name] == [client.models.retrieve(api.model_name).id]
    ids = enc.encode_ordinary(PROMPT)
    tokens = greedy_ids(ours, ids, 24)
    finish = "length" if len(tokens) == 24 else "stop"
    done = client.completions.create(model=api.model_name, prompt=PROMPT, max_tokens=24, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text == enc.decode(tokens)
    assert done.choices[0].finish_reason == finish
    generated = len(tokens) + (finish == "stop")  # the end-of-text is generated too
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        len(ids), generated, len(ids) + generated)
    chunks = list(client.completions.create(model=api.model_name, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True))
    assert [c.choices[0].text for c in chunks if c.choices[0].text] == streamed_pieces(enc, tokens)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [finish]
    as_ids = client.completions.create(model=api.model_name, prompt=ids, max_tokens=24, temperature=0)
    assert as_ids.choices[0].text == done.choices[0].text  # a prompt of token ids is the same prompt


def test_serve_chat_folds_the_conversation_into_the_checkpoint_template(api, tiny, enc):
    """As sample.py --chat folds its turns (test_chat_answers_each_line_and_forgets_on_reset): each question in the
    Alpaca template, each answer closed by <|endoftext|>; a system message is plain text before the turns."""
    ours = load(tiny[1])
    client = openai_client(api)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Name a fruit."}]
    ids = (enc.encode_ordinary("Be brief.\n\n") + enc.encode_ordinary(format_prompt("Name a color.")) +
           enc.encode_ordinary("Blue.") + [EOT] + enc.encode_ordinary(format_prompt("Name a fruit.")))
    want = enc.decode(greedy_ids(ours, ids, 16))
    done = client.chat.completions.create(model=api.model_name, messages=messages, max_tokens=16, temperature=0)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == want and done.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=api.model_name, messages=messages, max_completion_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_serve_seeded_samples_equal_sample_py_with_that_seed(api, tiny, capsys, monkeypatch):
    """Two prompts x n=2, generated as one batch: text j of a prompt is sample.py's for that prompt with seed 7 + j."""
    import sample as sample_py
    seen = batch_sizes(api, monkeypatch)
    prompts = [PROMPT, "Once upon a time, in a land far away,"]
    done = openai_client(api).completions.create(model=api.model_name, prompt=prompts, n=2, seed=7, temperature=1.0,
                                                 top_p=0.9, max_tokens=20)
    assert [c.index for c in done.choices] == [0, 1, 2, 3] and max(seen["step"]) == 4
    texts = [c.text for c in done.choices]
    assert len(set(texts)) == 4
    for i, text in enumerate(texts):
        settings = dict(model=str(tiny[1]), prompt=prompts[i // 2], seed=7 + i % 2, temperature=1.0, top_p=0.9,
                        max_new_tokens=20)
        sample_py.main({**config_keys(vars(sample_py)), **settings})
        assert capsys.readouterr().out == prompts[i // 2] + text + "\n"


def test_serve_stop_strings_and_n(api, tiny, enc):
    ours = load(tiny[1])
    client = openai_client(api)
    full = enc.decode(greedy_ids(ours, enc.encode_ordinary(PROMPT), 30))
    stop = full[8:12]  # in the middle of the text; the text ends before its first occurrence
    want = full[:full.index(stop)]
    done = client.completions.create(model=api.model_name, prompt=PROMPT, max_tokens=30, temperature=0, n=3,
                                      stop=["never in the text", stop])
    assert [(c.text, c.finish_reason) for c in done.choices] == [(want, "stop")] * 3
    streamed = client.completions.create(model=api.model_name, prompt=PROMPT, max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_serve_sixteen_concurrent_clients_each_get_their_own_answer(api, tiny, enc, monkeypatch):
    ours = load(tiny[1])
    client = openai_client(api)
    seen = batch_sizes(api, monkeypatch)
    prompts = [f"Question {i}:" + " why" * i for i in range(16)]  # distinct, of 3 to 18 tokens
    lengths = [4 + i for i in range(16)]  # rows leave at different steps, and waiting rows take their places
    prompts[0], lengths[1] = " ".join(["because"] * 100), 100  # these two never fit in the 128-token context together

    def ask(i):
        kwargs = dict(model=api.model_name, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
        return client.completions.create(**kwargs).choices[0].text
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == [enc.decode(greedy_ids(ours, enc.encode_ordinary(p), n)) for p, n in zip(prompts, lengths)]
    assert max(seen["step"]) == 8 and max(seen["join"]) > 0  # a full batch, and rows joined a running one
    assert raw_request(api, "/health")[1] == {"status": "ok", "model": api.model_name, "generating": 0, "waiting": 0}


def test_serve_long_prompt_is_cut_from_the_left_and_the_answer_says_so(api, tiny, enc):
    ours = load(tiny[1])
    words = " ".join(f"word{i}" for i in range(200))  # ~400 tokens; the tiny context is 128
    ids = enc.encode_ordinary(words)
    status, body = raw_request(api, "/v1/completions", {"prompt": words, "max_tokens": 20, "temperature": 0})
    assert status == 200 and body["usage"]["prompt_tokens"] == 108
    assert body["warnings"] == [f"the prompt is {len(ids)} tokens: only its last 108 are kept, so that "
                                "max_new_tokens=20 fit in the 128-token context"]
    assert body["choices"][0]["text"] == enc.decode(greedy_ids(ours, ids[-108:], 20))


@pytest.mark.parametrize("path, body, status, param, why", [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 400, "model", "is not served here"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "prompt must be a text"),
    ("/v1/completions", {}, 400, "prompt", "prompt must be a text"),
    ("/v1/completions", {"prompt": [1, 50257]}, 400, "prompt", "each from 0 to 50256"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens", "a whole number from 1 to 128"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 129}, 400, "max_tokens", "from 1 to 128"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "from 1 to 128"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature", "from 0 to 2"),
    ("/v1/completions", {"prompt": "hi", "temperature": True}, 400, "temperature", "from 0 to 2"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "above 0"),
    ("/v1/completions", {"prompt": "hi", "top_k": 0}, 400, "top_k", "at least 1"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "from 1 to 16"),
    ("/v1/completions", {"prompt": "hi", "n": 1.5}, 400, "n", "from 1 to 16"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 6}, 400, "n", "more than max_n=16"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed", "from 0 to"),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", 1]}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo", "not supported"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}, 400,
     "messages[1].content", "must be text"),
    ("/v1/embeddings", {"input": "hi"}, 404, None, "no POST /v1/embeddings"),
])
def test_serve_rejects_bad_input_with_an_openai_error_naming_the_field(api, path, body, status, param, why):
    got, answer = raw_request(api, path, body)
    assert got == status and answer["error"]["param"] == param and why in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


def test_serve_refuses_oversized_unframed_and_non_json_bodies_and_the_client_sees_the_field(api):
    # answered from the headers, before any of the body is read (a client still sending it would see a broken pipe)
    status, answer = raw_request(api, "/v1/completions", b"", {"Content-Length": str(api.c.max_body + 1)})
    assert status == 413 and "max_body" in answer["error"]["message"]
    status, answer = raw_request(api, "/v1/completions", iter([b'{"prompt": "hi"}']), {"Transfer-Encoding": "chunked"})
    assert status == 411
    status, answer = raw_request(api, "/v1/completions", b'{"prompt": "hi"}', {"Content-Type": "text/plain"})
    assert status == 415 and "Content-Type: application/json" in answer["error"]["message"]
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as error:
        openai_client(api).completions.create(model=api.model_name, prompt="hi", temperature=7)
    assert error.value.param == "temperature"


def test_serve_answers_429_past_the_queue_limit(tiny):
    server = start_server(tiny[1], max_batch=1, max_queue=2)
    gate, entered, real = threading.Event(), threading.Event(), server.gpt.next_logits

    def held(*args):  # the first request stops in its prefill until the gate opens
        entered.set()
        gate.wait(30)
        return real(*args)
    server.gpt.next_logits = held
    results = []
    body = {"prompt": "hi", "max_tokens": 3}
    threads = [threading.Thread(target=lambda: results.append(raw_request(server, "/v1/completions", body))) for _ in range(3)]
    try:
        threads[0].start()
        assert entered.wait(10)
        for t in threads[1:]:
            t.start()
        wait_until(lambda: raw_request(server, "/health")[1]["waiting"] == 2)
        status, answer = raw_request(server, "/v1/completions", body)
        assert status == 429 and answer["error"]["type"] == "rate_limit_error" and "max_queue" in answer["error"]["message"]
    finally:
        gate.set()
        for t in threads:
            t.join(30)
        stop_server(server)
    assert [status for status, _ in results] == [200, 200, 200]


def test_serve_needs_the_api_key_when_one_is_set(tiny):
    openai = pytest.importorskip("openai")
    server = start_server(tiny[1], api_key="open sesame")
    try:
        status, answer = raw_request(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        assert raw_request(server, "/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai_client(server, "open says me").models.list()
        done = openai_client(server, "open sesame").completions.create(model=server.model_name, prompt="hi", max_tokens=2)
        assert done.usage.completion_tokens >= 1
        assert raw_request(server, "/health")[0] == 200  # the page and the health check need no key
    finally:
        stop_server(server)


def read_events(sock, until="[DONE]"):
    """The data of the server-sent events read from sock, up to the one that contains until, or to the end of
    the connection."""
    data, events = b"", []
    while not (events and until in events[-1]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        events = [line[6:] for line in data.decode(errors="replace").splitlines() if line.startswith("data: ")]
    return events


def open_stream(port, body, stream=True):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps({**body, "stream": stream}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_serve_client_hanging_up_frees_its_row_at_once(api, monkeypatch):
    real = api.gpt.next_logits

    def slow(*args):  # 20 ms a step: 100 tokens take 2 s
        time.sleep(0.02)
        return real(*args)
    monkeypatch.setattr(api.gpt, "next_logits", slow)
    for stream in (True, False):  # mid-stream, or while waiting for the whole answer
        sock = open_stream(api.server_address[1], {"prompt": PROMPT, "max_tokens": 100, "temperature": 0}, stream)
        if stream:
            assert read_events(sock, until='"finish_reason": null')
        wait_until(lambda: raw_request(api, "/health")[1]["generating"] == 1)
        sock.close()
        hung_up = time.time()
        wait_until(lambda: raw_request(api, "/health")[1]["generating"] == 0, timeout=1.5)
        assert time.time() - hung_up < 0.5


def test_serve_stops_gracefully_on_ctrl_c(tmp_path):
    """Ctrl-C: the listening socket closes, the text being generated is finished, the one waiting is answered
    503, and the process exits 0."""
    reference_model(n_positions=1024).save_pretrained(tmp_path)  # room for 1,000 tokens: a stream to interrupt
    env = {**os.environ, "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "serve.log"  # a file, not a pipe: a pipe nobody reads until the end could fill and block
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "serve.py", f"--model={tmp_path}", "--port=0", "--max_batch=1"],
                                cwd=HERE, env=env, stderr=log_file, text=True)
    try:
        wait_until(lambda: "http://127.0.0.1:" in log_path.read_text() or proc.poll() is not None, timeout=120)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", log_path.read_text()).group(1))
        server = type("Address", (), {"server_address": ("127.0.0.1", port)})
        sock = open_stream(port, {"prompt": PROMPT, "max_tokens": 1000, "temperature": 0})
        first = read_events(sock, until='"finish_reason": null')
        waiting = []
        behind = threading.Thread(target=lambda: waiting.append(raw_request(server, "/v1/completions", {"prompt": "hi"})))
        behind.start()
        wait_until(lambda: raw_request(server, "/health")[1]["waiting"] == 1)
        proc.send_signal(2)
        rest = read_events(sock)
        behind.join(30)
        try:
            assert proc.wait(30) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve.py did not exit within 30 s of Ctrl-C; its log ends:\n{log_path.read_text()[-3000:]}")
    finally:
        proc.kill()
    chunks = [json.loads(e) for e in first + rest[:-1]]
    assert rest[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert waiting[0][0] == 503 and "shutting down" in waiting[0][1]["error"]["message"]
    log = log_path.read_text()
    assert "stopping: new requests are refused" in log and log.rstrip().endswith("stopped") and "Traceback" not in log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_serve_stopped_with_cancel_ends_the_texts_being_generated(tiny):
    """What a second Ctrl-C does: a stream being generated ends at once with an error event."""
    server = start_server(tiny[1])
    real = server.gpt.next_logits

    def slow(*args):  # 20 ms a step: 100 tokens take 2 s
        time.sleep(0.02)
        return real(*args)
    server.gpt.next_logits = slow
    sock = open_stream(server.server_address[1], {"prompt": PROMPT, "max_tokens": 100, "temperature": 0})
    assert read_events(sock, until='"finish_reason": null')
    started = time.time()
    server.shutdown()
    server.stop(cancel=True)
    events = read_events(sock, until='"error"')
    assert "this request was cancelled" in events[-1] and time.time() - started < 1.5
    assert not server.engine.thread.is_alive() and server.in_flight == 0


def test_serve_stopping_closes_connections_kept_alive(tiny):
    """A client's idle keep-alive connection (the OpenAI client keeps one) is closed when the server stops, so
    no handler thread is left waiting on it."""
    server = start_server(tiny[1])
    sock = socket.create_connection(server.server_address, timeout=5)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]
    started = time.time()
    stop_server(server)
    rest = b""
    while chunk := sock.recv(65536):  # the server's close: recv returns b"" instead of waiting
        rest += chunk
    assert time.time() - started < 2 and not server.connections
    sock.close()


def test_chat_page_streams_an_answer_in_a_headless_browser(api, tiny, enc, tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (requirements-dev)")
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): the chat page is not tested")
    ours = load(tiny[1])
    step = api.engine.step  # a token every 20 ms, as a real model gives them: the tiny one's 24 came in 4 reads
    monkeypatch.setattr(api.engine, "step", lambda: (time.sleep(0.02), step())[1])
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(f"{api.url}/")
            page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(api.model_name)}")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            # count the answer's changes as they happen: a streamed answer grows in several steps
            page.evaluate("""window.changes = 0; new MutationObserver(() => window.changes++)
                             .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
            page.fill("#input", "Name a color.")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelector('.meta') && /stop|length/.test(document.querySelector('.meta').textContent)")
            answer, changes = page.text_content(".assistant"), page.evaluate("window.changes")
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert answer == enc.decode(greedy_ids(ours, enc.encode_ordinary(format_prompt("Name a color.")), 24))
    assert changes > 5 and (tmp_path / "chat.png").read_bytes().startswith(b"\x89PNG")


def test_serve_help_and_bad_settings_are_one_line(api, tiny, capsys):
    import serve
    test_help_explains_every_setting_with_its_default("serve.py")
    for settings, whys in [(dict(max_batch=0, template="chatml", port=70000),  # found before anything is loaded
                            ["max_batch=0 must be at least 1", "template='chatml' must be one of", "port=70000 must be"]),
                           (dict(model=str(tiny[1]), port=api.server_address[1]),  # a port in use
                            [f"cannot listen on 127.0.0.1:{api.server_address[1]} (Address already in use)"])]:
        with pytest.raises(SystemExit) as stopped:
            serve.main({**config_keys(vars(serve)), **settings})
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1 and all(why in err for why in whys), err


# ----------------------------------------------------------------------------- GGUF: llama.cpp and Ollama



# the tokenizer's hard cases: runs of spaces and newlines, tabs, emoji (one character, several tokens), CJK,
# contractions, digit runs, and the end-of-text marker written as plain text
TRICKY = ["Hello world", "  two leading spaces,   three inside and a trailing one ",
          "line\nbreaks\n\n\n\tand\ttabs\r\n", "emoji 🦙🚀 and 😶\u200d🌫️ joined; 日本語 and Български",
          "I've 'RE you sure? We'Ve a'lL 3 33 333 3333 3.14 3...3", "<|endoftext|> written as text, <|endoftext|>",
          "```python\nprint('hi')  # ok\n```", ""]


@pytest.fixture(scope="module")
def gguf_read():
    gguf = pytest.importorskip("gguf", reason="llama.cpp's own GGUF reader: pip install -r requirements-dev.txt")
    return gguf.GGUFReader


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding, built from source (about 5 minutes on "
                               "2 cores): CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python")


# what the fixture's model is fine-tuned on, so that it predicts as peakily as a trained model does (a random one's
# next-token logits are nearly flat, and a near tie may fall either way under any rounding)
FINE_TUNING_TEXT = ("The meaning of life is, as far as anyone has ever been able to tell, to find something worth "
                    "doing and to do it well, with people one loves, for as long as one can, and then to rest. Every "
                    "effort moves you a little closer to it, and most of the way is walked in small steps that nobody "
                    "sees.")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory, enc):
    """The tiny model fine-tuned briefly with LoRA on q, v, mlp.c_fc and the head, merged (so its output head is its
    own), written with the Alpaca template as f32, f16 and q8_0; and the plain tiny model (tied head) as f32."""
    folder = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    lora = add_lora(load(tiny[1]).train(), rank=4, alpha=16, targets=("q", "v", "mlp.c_fc", "head"))
    opt = make_optimizer(lora, 3e-2, 0.0, (0.9, 0.95), "cpu")
    ids = torch.tensor([enc.encode_ordinary(FINE_TUNING_TEXT)])
    for _ in range(30):
        lora(ids[:, :-1], ids[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    lora = merge_lora(lora).eval()
    paths = {dtype: export_gguf(lora, folder / f"lora-{dtype}.gguf", dtype, ALPACA_TEMPLATE)[0] for dtype in DTYPES}
    base = load(tiny[1])
    paths["base"] = export_gguf(base, folder / "base.gguf", "f32")[0]
    return SimpleNamespace(lora=lora, base=base, paths=paths, folder=folder)


def gguf_fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()
            if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}


def llama_cpp_name(ours):
    """The name llama.cpp's gpt2 loader (src/models/gpt2.cpp) gives a tensor of model.py's GPT."""
    top = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight", "ln_f.weight": "output_norm.weight",
           "ln_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}
    if ours in top:
        return top[ours]
    _, block, *module, kind = ours.split(".")
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    return f"blk.{block}.{names['.'.join(module)]}.{kind}"


def q8_0_scales(tensor):
    """Each q8_0 block's stored f16 scale, read from the raw bytes (34 per block: the scale, then 32 int8)."""
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, 34)
    return raw[:, :2].copy().view(np.float16).astype(np.float32).reshape(*tensor.data.shape[:-1], -1)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_every_setting_token_and_weight(exported, gguf_read, dtype):
    from gguf.quants import dequantize
    reader = gguf_read(exported.paths[dtype])
    fields = gguf_fields(reader)
    expected = {"general.architecture": "gpt2", "general.file_type": DTYPES[dtype][1], "gpt2.context_length": 128,
                "gpt2.embedding_length": 64, "gpt2.feed_forward_length": 256, "gpt2.block_count": 2,
                "gpt2.attention.head_count": 4, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": EOT, "tokenizer.ggml.eos_token_id": EOT,
                "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": chat_template(ALPACA_TEMPLATE)}
    assert {k: fields[k] for k in expected} == expected
    assert abs(fields["gpt2.attention.layer_norm_epsilon"] - 1e-5) < 1e-12
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == len(types.data) == 50257 and len(reader.fields["tokenizer.ggml.merges"].data) == 50000
    sample = [tokens.contents(i) for i in (0, 198, 220, 262, 1169, 50256)]
    assert sample == ["!", "Ċ", "Ġ", "Ġthe", "the", "<|endoftext|>"]
    assert [types.contents(i) for i in (0, 262, 50256)] == [1, 1, 3]  # normal, normal, control
    assert reader.fields["tokenizer.ggml.merges"].contents(0) == "Ġ t"

    ours = {llama_cpp_name(name): t.detach() for name, t in exported.lora.state_dict().items()}
    assert {t.name for t in reader.tensors} == set(ours) and "output.weight" in ours  # the untied, merged head
    for t in reader.tensors:
        want = ours[t.name].numpy()
        assert tuple(int(n) for n in reversed(t.shape)) == want.shape, t.name  # GGUF lists the fastest dimension first
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1 or t.name == "position_embd.weight" or dtype == "f32":
            assert t.tensor_type.name == "F32" and np.array_equal(got, want), t.name
        elif dtype == "f16":
            assert t.tensor_type.name == "F16", t.name
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), t.name
        else:
            assert t.tensor_type.name == "Q8_0", t.name
            d = np.repeat(q8_0_scales(t), 32, axis=-1).reshape(want.shape)
            assert (np.abs(got - want) <= d / 2).all(), t.name  # round to nearest with the stored scale
            assert (d <= np.abs(want).reshape(-1, 32).max(-1).repeat(32).reshape(want.shape) / 127 * 1.001).all()


def test_gguf_tokenizer_is_gpt2s_own_vocabulary_recovered_from_tiktoken():
    """The merges rebuilt from tiktoken's ranks are OpenAI's vocab.bpe line for line, and the token strings its
    encoder.json: tiktoken built its gpt2 encoding from these two files, so it holds them in its cache."""
    from tiktoken.load import read_file_cached
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    tokens, merges = gpt2_vocab()
    assert merges == read_file_cached(base + "vocab.bpe").decode().split("\n")[1:-1]
    encoder = json.loads(read_file_cached(base + "encoder.json"))
    assert tokens == sorted(encoder, key=encoder.get)


def test_llama_cpp_tokenizes_exactly_as_tiktoken(exported, llama_cpp, enc):
    vocab = llama_cpp.Llama(str(exported.paths["base"]), vocab_only=True, verbose=False)
    for text in TRICKY:
        ids = enc.encode_ordinary(text)
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert vocab.detokenize(ids) == text.encode(), text
    assert vocab.tokenize(b"a<|endoftext|>b", add_bos=False, special=True) == [64, EOT, 65]  # as the control token


def llama_greedy(llm, ids, n):
    """llama.cpp's greedy continuation of ids, stopped before the first end-of-text (as greedy_ids)."""
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        if token == EOT or len(out) == n:
            return out
        out.append(token)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_export_as_we_do(exported, llama_cpp, enc, dtype):
    llm = llama_cpp.Llama(str(exported.paths[dtype]), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    teacher = enc.encode_ordinary(FINE_TUNING_TEXT)
    ids = teacher[:10]
    llm.eval(teacher)  # every position's logits at once: the next token at each, given the true text before it
    theirs = np.array(llm.scores[:len(teacher)])
    with torch.no_grad():
        ours = exported.lora(torch.tensor([teacher]))[0][0].numpy()
    same = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    error = np.abs(theirs - ours).max() / np.abs(ours).max()
    print(f"{dtype}: largest logit difference {error:.1e} of the largest logit; the same next token at "
          f"{same:.0%} of {len(teacher)} positions")
    # ggml's GELU reads a table of f16 inputs, so even f32 weights give logits only within a few 1e-4 of ours
    assert error < {"f32": 1e-3, "f16": 3e-3, "q8_0": 5e-2}[dtype]
    if dtype == "q8_0":
        assert same >= 0.95
    else:
        assert same == 1 and llama_greedy(llm, ids, 40) == greedy_ids(exported.lora, ids, 40)


def test_llama_cpp_ties_the_head_of_a_model_that_has_none(exported, llama_cpp, enc):
    llm = llama_cpp.Llama(str(exported.paths["base"]), n_ctx=128, n_threads=1, verbose=False)
    assert "tokenizer.chat_template" not in llm.metadata  # a plain GPT-2 continues text
    ids = enc.encode_ordinary(PROMPT)
    assert llama_greedy(llm, ids, 40) == greedy_ids(exported.base, ids, 40)


def chat_messages(enc, gpt):
    """A two-question conversation as chat messages, and sample.py --chat's context for its second question."""
    questions = ["Name a color.", "And a fruit?"]
    first = enc.encode_ordinary(format_prompt(questions[0]))
    answer = greedy_ids(gpt, first, 12)
    messages = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": enc.decode(answer)},
                {"role": "user", "content": questions[1]}]
    return messages, first + answer + [EOT] + enc.encode_ordinary(format_prompt(questions[1]))  # as chat_loop


def test_chat_template_renders_sample_pys_conversation(exported, enc):
    import jinja2.sandbox
    messages, context = chat_messages(enc, exported.lora)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers'
    template = env.from_string(chat_template(ALPACA_TEMPLATE))
    assert template.render(messages=messages, add_generation_prompt=True) == enc.decode(context)
    system = [{"role": "system", "content": "You are a pirate."}]  # the Alpaca preamble is the system prompt
    assert template.render(messages=system + messages) == enc.decode(context)


def test_llama_cpp_applies_the_chat_template_from_the_file(exported, llama_cpp, enc):
    messages, context = chat_messages(enc, exported.lora)
    llm = llama_cpp.Llama(str(exported.paths["f32"]), n_ctx=128, n_threads=1, verbose=False)
    rendered = enc.decode(context)
    # the text as tiktoken reads it, <|endoftext|> as the control token (a model's own answer may have come in other
    # tokens than the text's: any front-end that renders a chat to text tokenizes it afresh)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == enc.encode(rendered, allowed_special="all")
    assert EOT in llm.tokenize(rendered.encode(), add_bos=False, special=True)
    # llama-cpp-python's chat API picks the template up from the file by itself, and answers as we do
    reply = llm.create_chat_completion(messages[:1], temperature=0.0, max_tokens=12)["choices"][0]["message"]
    ours = greedy_ids(exported.lora, enc.encode_ordinary(format_prompt(messages[0]["content"])), 12)
    assert reply["content"] == b"".join(enc.decode_single_token_bytes(t) for t in ours).decode(errors="ignore")


GO_TEMPLATE = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct{ Role, Content string }

func main() {
	var data struct{ Messages []Message; Prompt string }
	json.NewDecoder(os.Stdin).Decode(&data)
	template.Must(template.New("t").Parse(os.Args[1])).Execute(os.Stdout, data)
}
"""


def test_ollama_template_renders_sample_pys_conversation_in_go(exported, tmp_path):
    import shutil
    if not shutil.which("go"):
        pytest.skip("Go's text/template renders Ollama's TEMPLATE: apt-get install golang-go")
    (tmp_path / "render.go").write_text(GO_TEMPLATE)
    messages = [{"Role": "user", "Content": "Name a color."}, {"Role": "assistant", "Content": 'Blue, {{not}} "this".'},
                {"Role": "system", "Content": "left out"}, {"Role": "user", "Content": "And a fruit?"}]
    render = subprocess.run(["go", "run", str(tmp_path / "render.go"), ollama_template(ALPACA_TEMPLATE)],
                            input=json.dumps({"Messages": messages}), capture_output=True, text=True,
                            env={**os.environ, "GOCACHE": str(tmp_path / "cache"), "GO111MODULE": "off"})
    assert render.returncode == 0, render.stderr
    assert render.stdout == (format_prompt("Name a color.") + 'Blue, {{not}} "this".<|endoftext|>'
                             + format_prompt("And a fruit?"))
    modelfile = (exported.folder / "lora-q8_0.Modelfile").read_text()
    assert f'TEMPLATE """{ollama_template(ALPACA_TEMPLATE)}"""' in modelfile


def test_ollama_modelfile_points_at_the_gguf_and_stops_at_end_of_text(exported):
    lines = (exported.folder / "lora-q8_0.Modelfile").read_text().splitlines()
    assert "FROM ./lora-q8_0.gguf" in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER num_ctx 128" in lines  # GPT-2 has no position past its context
    assert {"PARAMETER temperature 0.8", "PARAMETER top_p 0.95"} <= set(lines)  # sample.py's defaults
    assert 'TEMPLATE """{{ .Prompt }}"""' in (exported.folder / "base.Modelfile").read_text()


def test_transformers_loads_our_f32_gguf_with_the_same_logits(exported, gguf_read):
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(11))
    # transformers' GGUF reader takes context_length as n_ctx only: n_positions keeps its 1024 unless given
    hf = GPT2LMHeadModel.from_pretrained(exported.folder, gguf_file="lora-f32.gguf", n_positions=128).eval()
    assert max_logit_diff(hf, exported.lora, idx) <= 1e-5  # its own output head (a merged LoRA head) included


def test_export_gguf_refuses_bad_input_in_one_line(exported, tmp_path):
    gpt = exported.base
    (tmp_path / "taken.gguf").write_bytes(b"my own file")
    (tmp_path / "a-file").write_text("not a folder")
    for kwargs, message in ((dict(path=tmp_path / "m.gguf", dtype="q4_0"), "GGUF dtype 'q4_0' is not supported: "
                             "choose one of f32, f16, q8_0"),
                            (dict(path=tmp_path / "taken.gguf"), "taken.gguf already exists: choose another name, or "
                             "overwrite it"),
                            (dict(path=tmp_path / "m.bin"), "must end in .gguf"),
                            (dict(path=tmp_path / "a-file" / "m.gguf"), "cannot write"),
                            (dict(path=tmp_path / "m.gguf", template={"prompt": "no slot"}),
                             "{instruction} exactly once")):
        with pytest.raises(ValueError, match="^[^\n]*$") as e:
            export_gguf(gpt, **kwargs)
        assert message in str(e.value)
    assert (tmp_path / "taken.gguf").read_bytes() == b"my own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken.gguf"]  # no half file, no temp file left
    with pytest.raises(ValueError, match="a text classifier .* is not a language model"):
        export_gguf(Classifier(GPT(gpt.config), 2), tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="merge the LoRA adapters first"):
        export_gguf(add_lora(GPT(gpt.config), 4, 8), tmp_path / "l.gguf")
    with pytest.raises(ValueError, match="int8"):
        export_gguf(quantize_int8(GPT(gpt.config)), tmp_path / "i.gguf")
    broken = GPT(gpt.config)
    with torch.no_grad():
        broken.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="blk.1.ffn_up.weight holds NaN"):
        export_gguf(broken, tmp_path / "nan.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken.gguf"]
    export_gguf(gpt, tmp_path / "taken.gguf", overwrite=True)
    assert (tmp_path / "taken.gguf").read_bytes()[:4] == b"GGUF" and (tmp_path / "taken.Modelfile").exists()


def test_command_line_exports_a_finetuned_checkpoint(finetuned, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "load_gpt2.py", f"--model={finetuned}", *args], cwd=HERE,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = tmp_path / "alpaca" / "model.gguf"
    result = run(f"--export={out}", "--export_dtype=q8_0")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}\nwrote {out.with_suffix('.Modelfile')}" in result.stdout
    assert out.read_bytes()[:4] == b"GGUF" and chat_template(ALPACA_TEMPLATE).encode() in out.read_bytes()
    again = run(f"--export={out}")  # refused before the model is loaded
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert again.stderr.startswith(f"error: {out} already exists: choose another name, or overwrite it")
