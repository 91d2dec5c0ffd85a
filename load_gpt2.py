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
import os
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import requests
import torch

from data import check_template
from download import DownloadError, download
from weights import atomic_write, first_line, read_json, read_llmc, read_safetensors, write_safetensors
from lora import add_lora, merge_lora
from model import GPT, PRESETS, GPTConfig

HF_REPO = "openai-community/{name}"  # the hub's home of OpenAI's GPT-2 checkpoints
HF_FILES = ("config.json", "model.safetensors")
MAX_WEIGHTS = {"gpt2": 1 << 30, "gpt2-medium": 2 << 30, "gpt2-large": 4 << 30, "gpt2-xl": 8 << 30}  # bytes; 548 MB ... 6.4 GB
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir():
    folder = Path(os.environ.get("NANOFT_CACHE", Path.home() / ".cache" / "nanoft")).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"the download cache {folder} (NANOFT_CACHE) is a file, not a folder: point NANOFT_CACHE "
                            f"at a folder")
    return folder


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def download_gpt2(name):
    """The cache folder holding config.json and model.safetensors of an OpenAI GPT-2 checkpoint, each checked
    (a GPT-2 config; a valid safetensors header) before it is cached."""
    folder = cache_dir() / name
    base = f"{hf_endpoint()}/{HF_REPO.format(name=name)}/resolve/main"
    ways = (f"set HF_ENDPOINT to a mirror (now {hf_endpoint()}), or pass --model=<folder> with config.json and "
            f"model.safetensors you already have")
    checks = {"config.json": lambda p: read_hf_config(p), "model.safetensors": lambda p: read_safetensors(p)}
    for file in HF_FILES:
        if offline() and not (folder / file).exists():
            raise DownloadError(f"{folder / file} is not in the cache and HF_HUB_OFFLINE is set: unset "
                                f"HF_HUB_OFFLINE to download it from {base}/{file}, or {ways}")
        try:
            download(f"{base}/{file}", folder / file, desc=f"{name}/{file}", check=checks[file],
                     max_bytes=1 << 20 if file == "config.json" else MAX_WEIGHTS[name])
        except requests.RequestException as e:
            raise DownloadError(f"could not download {name} from {base}/{file} ({e.__class__.__name__}): "
                                f"check your network, or {ways}") from None
        except DownloadError as e:
            raise DownloadError(f"could not get model '{name}': {e}; or {ways}") from None
    return folder


# ----------------------------------------------------------------------------- mapping into model.py

def read_hf_config(path):
    """GPTConfig from a Hugging Face config.json file, or a ValueError naming the file and what is wrong."""
    try:
        return config_from_hf(read_json(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_hf(hf):
    """GPTConfig from a Hugging Face GPT-2 config.json dict."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json holds a JSON {type(hf).__name__}, not an object of GPT-2 settings")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json describes a {hf['model_type']!r} model, not GPT-2")
    missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in hf]
    if missing:
        raise ValueError(f"config.json has no {', '.join(missing)}: it does not describe a GPT-2")
    return check_config(GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                                  n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"]))


def config_from_dict(values):
    """GPTConfig from a checkpoint's 'model_config' dict, checked."""
    if not isinstance(values, dict) or not set(values) <= set(GPTConfig.__dataclass_fields__):
        raise ValueError(f"its model_config {str(values)[:100]} is not GPT-2's settings")
    return check_config(GPTConfig(**values))


def check_config(config):
    """config, or a ValueError naming the setting that no GPT-2 can have."""
    for key, most in (("block_size", 1 << 20), ("vocab_size", 1 << 20), ("n_layer", 1024), ("n_head", 1024),
                      ("n_embd", 1 << 16)):
        value = getattr(config, key)
        if type(value) is not int or not 1 <= value <= most:
            raise ValueError(f"{key}={value!r} is not a size a GPT-2 can have (a whole number from 1 to {most:,})")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    if config.vocab_size < 50257:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than GPT-2's tokenizer (50,257 tokens)")
    if not (isinstance(config.dropout, (int, float)) and 0 <= config.dropout < 1) or type(config.bias) is not bool:
        raise ValueError(f"dropout={config.dropout!r} / bias={config.bias!r} are not valid settings")
    return config


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
    if isinstance(head, torch.Tensor) and isinstance(wte, torch.Tensor) and head.shape == wte.shape and \
            torch.equal(head, wte):
        del state["lm_head.weight"]
    return state


def check_state(state, config):
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor; else return state."""
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"its weights are not all tensors: {', '.join(map(str, not_tensors[:3]))} ...")
    blocks = {k.split(".")[1] for k in state if k.startswith("h.")}
    if len(blocks) != config.n_layer:  # before a model of n_layer blocks is built to compare shapes with
        raise ValueError(f"it says n_layer={config.n_layer} but holds {len(blocks)} blocks of weights")
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
        try:
            config = read_hf_config(path / "config.json")
            tensors = read_safetensors(path / "model.safetensors")
        except ValueError as e:
            if str(name_or_path) in PRESETS:  # checked when it was downloaded: changed in the cache since
                raise ValueError(f"{e}; it is in the download cache: delete {path} to download it again") from None
            raise
    elif path.suffix == ".safetensors":
        tensors = read_safetensors(path)
        beside = path.with_name("config.json")
        config = read_hf_config(beside) if beside.exists() else config_from_tensors(tensors)
    elif path.suffix == ".bin":  # llm.c's checkpoint: already in model.py's names and layout
        values, state = read_llmc(path)
        config = config_from_dict(values)
        return build(config, check_state(state, config), device, dtype, dropout), info
    else:
        ckpt = read_checkpoint(path)
        if "model_args" in ckpt:
            return nanogpt_model(ckpt, device, dtype, dropout, path), info
        info = {key: ckpt.get(key) for key in info}
        if info["template"] is not None:
            try:
                check_template(info["template"])
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
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
    return check_config(GPTConfig(block_size=names["wpe.weight"].shape[0], vocab_size=vocab_size, n_layer=n_layer,
                                  n_head=max(1, n_embd // 64), n_embd=n_embd))


# ----------------------------------------------------------------------------- our own checkpoints

def read_checkpoint(path):
    """The dict a checkpoint of our scripts holds ({'model': state_dict, 'model_config': dict, ...}), read once,
    memory-mapped (a tensor is read when it is used) and with weights_only (a pickle cannot run code). Every
    byte is checked first against the CRC32 torch.save stores for each record: a damaged file is refused."""
    check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's own words on a pickle it refused: what it blocked, and the risk of loading it
        said = [s.strip() for s in re.split(r"(?<=\.)\s+", str(e)) if "arbitrary code" in s or "GLOBAL" in s]
        raise ValueError(f"{path} is not a checkpoint this project can read ({e.__class__.__name__}: "
                         f"{first_line(e)[:200]}){'; torch says: ' + ' '.join(said) if said else ''}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not ckpt.keys() & {"model_config",
                                                                                                   "model_args"}:
        raise ValueError(f"{path} is not a nanoFT (or nanoGPT) checkpoint (expected the keys 'model' and "
                         f"'model_config')")
    return ckpt


def check_archive(path):
    """Read every record of a torch.save archive (a zip) and compare it with its stored CRC32."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a checkpoint this project can read (not a torch.save archive: "
                         f"{first_line(e) or 'empty or cut short'}); if it was copied, copy it again") from None
    if bad is not None:
        raise ValueError(f"{path} is damaged: its record {bad} does not match its checksum (a disk or copy "
                         f"error?); use another copy, or best.pt, or start a new run")


def model_from_checkpoint(ckpt, device="cpu", dtype=torch.float32, dropout=0.0, merge_lora=True, path="checkpoint"):
    """The GPT of a checkpoint dict (read_checkpoint) that path held, its LoRA adapters merged or kept."""
    if ckpt.get("kind") == "classifier":  # gpt.* and head.* weights: a GPT-2 with no language-model head
        raise ValueError(f"{path} is a text classifier ({', '.join(map(str, ckpt.get('labels', [])))}) written by "
                         f"classify.py, not a language model: use it with python classify.py --model={path} --text=...")
    try:
        config = config_from_dict(ckpt["model_config"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # from a compiled model
    adapters = {k: state.pop(k) for k in list(state) if ".lora_" in k}
    model = build(config, check_state(drop_tied_head(state), config), device, dtype, dropout)
    return restore_lora(model, ckpt.get("lora"), adapters, merge_lora, path)


def nanogpt_model(ckpt, device, dtype, dropout, path):
    """The GPT of a nanoGPT ckpt.pt: {'model_args': {n_layer, n_head, n_embd, block_size, bias, vocab_size, ...},
    'model': its state_dict}, whose names carry 'transformer.' (and a compiled model's '_orig_mod.'), whose Linear
    weights are already (out, in), and whose vocabulary may be padded (50,304): cut back to GPT-2's 50,257, as no
    token id past them ever comes in."""
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise ValueError(f"{path}: its model_args {str(args)[:80]} are not nanoGPT's settings")
    values = {k: args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias") if k in args}
    try:
        config = config_from_dict({**values, "vocab_size": min(values.get("vocab_size", 50257), 50257)})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    state = {}
    for name, t in ckpt["model"].items():
        name = name.removeprefix("_orig_mod.").removeprefix("transformer.")
        if not name.endswith(".attn.bias"):  # nanoGPT's causal mask buffer (without flash attention)
            state[name] = t[:config.vocab_size] if name in ("wte.weight", "lm_head.weight") else t
    return build(config, check_state(drop_tied_head(state), config), device, dtype, dropout)


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


def with_biases(model):
    """model's state_dict with a zero bias for every Linear (but lm_head) and LayerNorm that has none (a model with
    bias=False, nanoGPT's option): the same function, in the shape GPT-2's formats require."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is None and name != "lm_head":
            state[f"{name}.bias"] = torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
    return state


def export_hf(model, folder):
    """Write config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    if any(".lora_" in name for name in model.state_dict()):
        raise ValueError("export_hf needs a plain GPT-2: merge the LoRA adapters first (merge_lora in lora.py)")
    tied = model.lm_head.weight is model.wte.weight
    tensors = {}
    for name, t in with_biases(model).items():
        if name == "lm_head.weight" and tied:
            continue  # tied to wte, as in OpenAI's files
        tensors[name] = t.t() if name.endswith(CONV1D) else t
    write_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
                 "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
                 "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "layer_norm_epsilon": 1e-5,
                 "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": tied}
    atomic_write(folder / "config.json", [json.dumps(hf_config, indent=2).encode()])
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
    from configurator import configure, fail
    from data import tokenizer
    from generation import device_problem
    from gguf_export import check_export, export_gguf
    configure(globals())
    problems = [p for p in [device_problem(device)] if p]
    problems += [] if max_new_tokens >= 1 else [f"max_new_tokens={max_new_tokens} must be at least 1"]
    problems += [] if prompt or export else ["prompt is empty: give the text the model should continue"]
    if problems:
        fail("; ".join(problems))
    try:
        if export:
            check_export(export, export_dtype, overwrite)  # before a long load
        gpt, info = load_model(model, device=device)
        written = export_gguf(gpt, export, export_dtype, info["template"], overwrite) if export else ()
        enc = tokenizer()
    except (DownloadError, ValueError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    print(f"{model}: {gpt.config}")
    print(f"parameters: {gpt.num_params() / 1e6:.1f}M")
    if written:
        print("\n".join(f"wrote {path}" for path in written))
        print(f"run it: llama-cli -m {written[0]} -c {gpt.config.block_size}   or   "
              f"ollama create mymodel -f {written[1]} && ollama run mymodel")
    else:
        ids = torch.tensor([enc.encode_ordinary(prompt)], device=device)
        out = gpt.generate(ids, max_new_tokens, temperature=0)
        print(enc.decode(out[0].tolist()))
