"""
Load GPT-2 into model.py: OpenAI's four checkpoints from the Hugging Face hub, a local Hugging Face
folder or .safetensors file, or a checkpoint written by our own scripts (the one place that reads them).
Also the way back (export_hf), and on to llama.cpp and Ollama (gguf_export.py).

    model = load_gpt2("gpt2-medium")          # downloads once into ~/.cache/nanoft
    python load_gpt2.py --model=gpt2-xl        # download, load, print the config and a greedy sample
    python load_gpt2.py --model=out/alpaca/ckpt.pt --export=model.gguf --export_dtype=q8_0   # + model.Modelfile

Needs nothing but torch, numpy and requests: safetensors files are read and written here, and downloads
(download.py) are checked before they are cached, so a partial or corrupt file is never loaded.
"""

import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import requests
import torch

from download import DownloadError, download
from lora import add_lora, merge_lora
from model import GPT, PRESETS, GPTConfig

HF_REPO = "openai-community/{name}"  # the hub's home of OpenAI's GPT-2 checkpoints
HF_FILES = ("config.json", "model.safetensors")
MAX_HEADER = 100_000_000  # a safetensors header larger than this is not a real one
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir():
    return Path(os.environ.get("NANOFT_CACHE", Path.home() / ".cache" / "nanoft"))


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def download_gpt2(name):
    """The cache folder holding config.json and model.safetensors of an OpenAI GPT-2 checkpoint."""
    folder = cache_dir() / name
    base = f"{hf_endpoint()}/{HF_REPO.format(name=name)}/resolve/main"
    for file in HF_FILES:
        if offline() and not (folder / file).exists():
            raise DownloadError(f"{folder / file} is not in the cache and HF_HUB_OFFLINE is set: run once with "
                                f"network access (or unset HF_HUB_OFFLINE) to download it from {base}/{file}")
        try:
            download(f"{base}/{file}", folder / file, desc=f"{name}/{file}")
        except requests.RequestException as e:
            raise DownloadError(f"could not download {name} from {base}/{file} ({e.__class__.__name__}): "
                                f"check your network, or set HF_ENDPOINT to a mirror") from None
        except DownloadError as e:
            raise DownloadError(f"could not get model '{name}': {e} (HF_ENDPOINT={hf_endpoint()})") from None
    return folder


# ----------------------------------------------------------------------------- safetensors

DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
          "BF16": (np.uint16, torch.bfloat16)}  # numpy has no bfloat16: read its bits as uint16


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, memory-mapped (no copy until a tensor is converted).

    The header is hostile until checked: its size, its JSON, every dtype, shape and byte range.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: only {file_size} bytes")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n > file_size - 8:
            raise ValueError(f"{path} is not a valid safetensors file: header size {n} is larger than "
                             f"{'the file' if n <= MAX_HEADER else 'the 100 MB limit'}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a valid safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n, shape=(data_size,)) if data_size else None
    tensors = {}
    for name, info in header.items():
        np_dtype, torch_dtype, shape, (start, end) = _check_entry(path, name, info, data_size)
        array = data[start:end].view(np_dtype).reshape(shape) if end > start else np.zeros(shape, np_dtype)
        tensors[name] = torch.from_numpy(array).view(torch_dtype)
    return tensors


def _check_entry(path, name, info, data_size):
    def bad(why):
        return ValueError(f"{path} is not a valid safetensors file: tensor '{name}' {why}")
    if not isinstance(info, dict):
        raise bad("has no description")
    if info.get("dtype") not in DTYPES:
        raise bad(f"has dtype {info.get('dtype')!r}; supported: {', '.join(DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"has data_offsets {offsets!r} outside the {data_size} data bytes")
    np_dtype, torch_dtype = DTYPES[info["dtype"]]
    if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(np_dtype).itemsize:
        raise bad(f"has {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
    return np_dtype, torch_dtype, shape, offsets


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as .safetensors (temp file + rename, so a crash leaves no half file)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        blob = t.view(torch.uint16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    _atomic_write(path, [len(head).to_bytes(8, "little"), head, *blobs])


def _atomic_write(path, chunks):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- mapping into model.py

def config_from_hf(hf):
    """GPTConfig from a Hugging Face GPT-2 config.json dict."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json describes a '{hf['model_type']}' model, not GPT-2")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])


def hf_to_ours(tensors, config):
    """Rename and transpose a Hugging Face GPT-2 state dict into model.py's."""
    ours = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers
        if name.endswith(CONV1D):
            t = t.t()  # Hugging Face's Conv1D stores (in, out); nn.Linear wants (out, in)
        ours[name] = t
    return check_state(drop_tied_head(ours), config)


def drop_tied_head(state):
    """Leave out lm_head.weight where it is the token embedding, as GPT-2 ties them (OpenAI's files do not even
    hold it); keep it where it differs (a head fine-tuned with LoRA, merged): such a model gets its own head."""
    head, wte = state.get("lm_head.weight"), state.get("wte.weight")
    if head is not None and wte is not None and head.shape == wte.shape and torch.equal(head, wte):
        del state["lm_head.weight"]
    return state


def check_state(state, config):
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor; else return state."""
    with torch.device("meta"):  # shapes only, nothing allocated
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state) - {"lm_head.weight"})  # no head: tied to wte
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
                       for k in expected.keys() & state.keys() if state[k].shape != expected[k])
    problems = [f"{what}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
                if names]
    if problems:
        raise ValueError(f"the weights do not fit a GPT-2 with n_layer={config.n_layer}, n_head={config.n_head}, "
                         f"n_embd={config.n_embd}, vocab_size={config.vocab_size}, block_size={config.block_size}: "
                         + "; ".join(problems))
    return state


def build(config, state_dict, device="cpu", dtype=torch.float32, dropout=0.0):
    """GPT(config) holding state_dict's weights, converted once to dtype on device; no random init."""
    with torch.device("meta"):
        model = GPT(replace(config, dropout=dropout))
    # one copy per tensor, out of the memory map (or transposed view) into its own contiguous memory
    state_dict = {k: v.to(device=device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
                  for k, v in state_dict.items()}
    tied = "lm_head.weight" not in state_dict  # else an untied head (drop_tied_head)
    if tied:
        state_dict["lm_head.weight"] = state_dict["wte.weight"]
    model.load_state_dict(state_dict, assign=True)
    if tied:
        model.tie_weights()  # assign replaced wte's Parameter: share it with lm_head again
    return model.eval()


def load_gpt2(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0, merge_lora=True):
    """GPT-2 from a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face folder
    (config.json + model.safetensors), a .safetensors file or a checkpoint (.pt) of our scripts.
    dropout is for fine-tuning (OpenAI trained GPT-2 with 0.1; inference wants 0). A checkpoint trained with
    LoRA comes with its adapters merged into the weights, or, with merge_lora=False, as adapters (to resume)."""
    return load_model(name_or_path, device, dtype, dropout, merge_lora)[0]


def load_model(name_or_path, device="cpu", dtype=torch.float32, dropout=0.0, merge_lora=True):
    """(model, info) as load_gpt2 loads it; info holds what a checkpoint of our scripts says about the model:
    its prompt 'template', its run 'config' and its dataset's 'meta' (None where a file has none)."""
    path = Path(str(name_or_path))
    info = {"template": None, "config": None, "meta": None}
    if str(name_or_path) in PRESETS:
        path = download_gpt2(str(name_or_path))
    elif not path.exists():
        raise FileNotFoundError(f"model '{name_or_path}' is neither a GPT-2 name ({', '.join(PRESETS)}) nor "
                                f"an existing file or folder")
    if path.is_dir():
        missing = [f for f in HF_FILES if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not a Hugging Face GPT-2 folder: it has no {', '.join(missing)}")
        config = config_from_hf(json.loads((path / "config.json").read_text()))
        tensors = read_safetensors(path / "model.safetensors")
    elif path.suffix == ".safetensors":
        tensors = read_safetensors(path)
        beside = path.with_name("config.json")
        config = config_from_hf(json.loads(beside.read_text())) if beside.exists() else config_from_tensors(tensors)
    else:
        ckpt = read_checkpoint(path)
        info = {key: ckpt.get(key) for key in info}
        return model_from_checkpoint(ckpt, device, dtype, dropout, merge_lora, path), info
    return build(config, hf_to_ours(tensors, config), device, dtype, dropout), info


def config_from_tensors(tensors):
    """A bare .safetensors file with no config.json beside it: read the sizes off the tensors (n_head by
    GPT-2's rule of 64-dim heads, as in all four OpenAI models)."""
    names = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if "wte.weight" not in names or "wpe.weight" not in names:
        raise ValueError("this .safetensors file has no wte.weight / wpe.weight: it is not a GPT-2 checkpoint")
    vocab_size, n_embd = names["wte.weight"].shape
    n_layer = len({k.split(".")[1] for k in names if k.startswith("h.")})
    return GPTConfig(block_size=names["wpe.weight"].shape[0], vocab_size=vocab_size, n_layer=n_layer,
                     n_head=max(1, n_embd // 64), n_embd=n_embd)


# ----------------------------------------------------------------------------- our own checkpoints

def read_checkpoint(path):
    """The dict a checkpoint of our scripts holds ({'model': state_dict, 'model_config': dict, ...}), read once,
    memory-mapped (a tensor is read when it is used) and with weights_only (a pickle cannot run code)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint this project can read ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a nanoFT checkpoint (expected the keys 'model' and 'model_config')")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", dtype=torch.float32, dropout=0.0, merge_lora=True, path="checkpoint"):
    """The GPT of a checkpoint dict (read_checkpoint) that path held, its LoRA adapters merged or kept."""
    if ckpt.get("kind") == "classifier":  # gpt.* and head.* weights: a GPT-2 with no language-model head
        raise ValueError(f"{path} is a text classifier ({', '.join(map(str, ckpt.get('labels', [])))}) written by "
                         f"classify.py, not a language model: use it with python classify.py --model={path} --text=...")
    config = GPTConfig(**ckpt["model_config"])
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # from a compiled model
    adapters = {k: state.pop(k) for k in list(state) if ".lora_" in k}
    model = build(config, check_state(drop_tied_head(state), config), device, dtype, dropout)
    return restore_lora(model, ckpt.get("lora"), adapters, merge_lora, path)


def restore_lora(model, lora, adapters, merge, path, head="lm_head"):
    """Put a checkpoint's LoRA adapters (its 'lora' settings and lora_* tensors) back on model (head: the Linear
    the 'head' target means); merged into the weights, or kept as adapters to go on training. Returns model."""
    if not lora:
        if adapters:
            raise ValueError(f"{path} holds LoRA tensors ({next(iter(adapters))}, ...) but no 'lora' settings")
        return model
    if not isinstance(lora, dict) or set(lora) != {"rank", "alpha", "dropout", "targets"}:
        raise ValueError(f"{path} has LoRA settings {lora!r}; expected rank, alpha, dropout and targets")
    add_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], head)
    expected = {k: v.shape for k, v in model.state_dict().items() if ".lora_" in k}
    if expected != {k: v.shape for k, v in adapters.items()}:
        wrong = sorted(set(expected) ^ set(adapters)) or [k for k in expected if adapters[k].shape != expected[k]]
        raise ValueError(f"{path}: its LoRA tensors do not fit rank {lora['rank']} on {', '.join(lora['targets'])} "
                         f"({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")
    model.load_state_dict(adapters, strict=False)
    return merge_lora(model) if merge else model


def export_hf(model, folder):
    """Write config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    if any(".lora_" in name for name in model.state_dict()):
        raise ValueError("export_hf needs a plain GPT-2: merge the LoRA adapters first (merge_lora in lora.py)")
    tied = model.lm_head.weight is model.wte.weight
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # tied to wte, as in OpenAI's files
        tensors[name] = t.t() if name.endswith(CONV1D) else t
    write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
                 "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
                 "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "layer_norm_epsilon": 1e-5,
                 "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": tied}
    _atomic_write(folder / "config.json", [json.dumps(hf_config, indent=2).encode()])
    return folder


# ----------------------------------------------------------------------------- command line

model = "gpt2"  # a GPT-2 name, a Hugging Face folder, a .safetensors file or a ckpt.pt
prompt = "Every effort moves you"  # the text the model continues (greedily) after loading
max_new_tokens = 20  # how many tokens it adds
device = "cpu"  # cpu, cuda or mps
export = ""  # a .gguf file to write the model to, for llama.cpp and Ollama (and a .Modelfile beside it)
export_dtype = "f16"  # the GGUF's weights: f32, f16 or q8_0 (8 bits, llama.cpp's blocks of 32)
overwrite = False  # replace an existing export

if __name__ == "__main__":
    import tiktoken
    from configurator import configure, fail
    from gguf_export import check_export, export_gguf
    configure(globals())
    try:
        if export:
            check_export(export, export_dtype, overwrite)  # before a long load
        gpt, info = load_model(model, device=device)
        written = export_gguf(gpt, export, export_dtype, info["template"], overwrite) if export else ()
    except (DownloadError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    print(f"{model}: {gpt.config}")
    print(f"parameters: {gpt.num_params() / 1e6:.1f}M")
    if written:
        print("\n".join(f"wrote {path}" for path in written))
        print(f"run it: llama-cli -m {written[0]} -c {gpt.config.block_size}   or   "
              f"ollama create mymodel -f {written[1]} && ollama run mymodel")
    else:
        enc = tiktoken.get_encoding("gpt2")
        ids = torch.tensor([enc.encode(prompt)], device=device)
        out = gpt.generate(ids, max_new_tokens, temperature=0)
        print(enc.decode(out[0].tolist()))
