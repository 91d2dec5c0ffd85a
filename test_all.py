"""
nanoFT's tests, in one file. The reference is Hugging Face transformers' GPT2LMHeadModel (a test-only
dependency): random-init models saved with save_pretrained, so the files are real files in the real format.
Downloads are tested against a hub-like server on 127.0.0.1. Run: python -m pytest test_all.py
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import load_gpt2
from configurator import configure
from load_gpt2 import DownloadError, export_hf, load_gpt2 as load, read_safetensors, write_safetensors
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers", reason="the reference implementation: pip install -r requirements-dev.txt")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

HERE = Path(__file__).parent
SHARED_DATA = os.environ.get("NANOFT_SHARED_DATA")
needs_shared_data = pytest.mark.skipif(not SHARED_DATA, reason="NANOFT_SHARED_DATA is not set: it names the "
                                       "folder of real datasets (../shared/data in CI, set by .ci/run)")
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
    with pytest.raises(ValueError, match=r"missing: h\.2\.attn\.c_attn\.bias"):
        load(tmp_path)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a nanoFT checkpoint"):
        load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="neither a GPT-2 name"):
        load("gpt3")


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
            return self.send_error(416, "Range Not Satisfiable")
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
    monkeypatch.setattr(load_gpt2, "BACKOFF", 0.01)
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
    (tmp_path / "cfg.py").write_text("lr = 1e-5\nbatch_size = 4\n_private = 1\n")
    config = configure(settings, [str(tmp_path / "cfg.py"), "--batch_size=2"])
    assert config["lr"] == 1e-5 and config["batch_size"] == 2
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
