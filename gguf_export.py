"""
GGUF out: model.py's GPT-2 as one file that llama.cpp, Ollama and LM Studio run (llama.cpp's arch 'gpt2'), with
GPT-2's tokenizer and, for an instruction checkpoint, its prompt template inside, and an Ollama Modelfile beside it.

    export_gguf(gpt, "model.gguf", dtype="q8_0", template=info["template"])   # also writes model.Modelfile
    python load_gpt2.py --model=out/alpaca/ckpt.pt --export=model.gguf --export_dtype=q8_0

A small writer of our own after the GGUF spec (ggml's docs/gguf.md): a header, typed key-value metadata, a table
of tensors, then the tensors' bytes, each 32-byte aligned. The `gguf` package of llama.cpp's authors reads it back
in the tests; nothing here needs more than torch, numpy and tiktoken. Names, shapes and metadata follow what
llama.cpp's gpt2 loader asks for (src/models/gpt2.cpp) and what its convert_hf_to_gguf.py writes for GPT-2.
"""

import struct
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from weights import atomic_write
from model import GPT

EOT = 50256  # <|endoftext|>: GPT-2's only special token, its BOS and EOS
VOCAB = 50257  # the GPT-2 tokenizer's size; a model with more rows gets unused padding tokens
ALIGNMENT = 32  # GGUF's default: every tensor's bytes start at a multiple of it
QK8_0 = 32  # weights per q8_0 block

# GGUF value types (GGUFValueType) and GGML tensor types (GGMLQuantizationType) that we write
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
PACK = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?"}
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
# --export_dtype -> (the type of every large matrix, general.file_type as llama.cpp names it: ALL_F32, MOSTLY_F16...)
DTYPES = {"f32": (GGML_F32, 0), "f16": (GGML_F16, 1), "q8_0": (GGML_Q8_0, 7)}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5

# sample.py's defaults, so llama.cpp and Ollama sample as our scripts do (top_k 0: no limit)
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 0}


# ----------------------------------------------------------------------------- GPT-2's tokenizer from tiktoken

def byte_to_unicode():
    """GPT-2's table of the 256 bytes as printable characters (how its vocabulary files spell tokens): the printable
    Latin-1 bytes stand for themselves, the others (space, control bytes...) for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_split(ranks, token, rank):
    """The two tokens whose merge makes token: tiktoken's byte-pair merging (always the adjacent pair whose merge
    ranks lowest) on token's own bytes, with only the merges learnt before it (ranks below rank)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        merges = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(merges)
        if best >= rank:
            raise ValueError(f"token {token!r} cannot be made from earlier tokens: not a BPE vocabulary")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@lru_cache(maxsize=1)
def gpt2_vocab():
    """(token strings, merges) of GPT-2's tokenizer in its own spelling (byte_to_unicode), recovered from tiktoken's
    ranks: token i is the bytes of rank i and merge k makes token 256 + k, as in OpenAI's encoder.json and vocab.bpe."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ranks = enc._mergeable_ranks  # bytes -> rank (the token id), the 50,256 ordinary tokens
    spell = byte_to_unicode()
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    tokens = ["".join(spell[b] for b in token) for token, _ in by_rank] + ["<|endoftext|>"]
    merges = [" ".join("".join(spell[b] for b in part) for part in bpe_split(ranks, token, rank))
              for token, rank in by_rank if len(token) > 1]
    assert len(tokens) == VOCAB and [r for _, r in by_rank] == list(range(EOT))
    return tokens, merges


def tokenizer_metadata(vocab_size):
    tokens, merges = gpt2_vocab()
    padding = [f"[PAD{i}]" for i in range(VOCAB, vocab_size)]  # rows no token uses (a vocabulary padded to 50304)
    types = [TOKEN_NORMAL] * EOT + [TOKEN_CONTROL] + [TOKEN_UNUSED] * len(padding)
    return [("tokenizer.ggml.model", STRING, "gpt2"),  # byte-level BPE
            ("tokenizer.ggml.pre", STRING, "gpt-2"),  # GPT-2's pre-tokenizer regex
            ("tokenizer.ggml.tokens", (ARRAY, STRING), tokens + padding),
            ("tokenizer.ggml.token_type", (ARRAY, I32), types),
            ("tokenizer.ggml.merges", (ARRAY, STRING), merges),
            ("tokenizer.ggml.bos_token_id", U32, EOT),
            ("tokenizer.ggml.eos_token_id", U32, EOT),
            ("tokenizer.ggml.add_bos_token", BOOL, False)]  # GPT-2 starts a text with no BOS


# ----------------------------------------------------------------------------- the prompt template travels along

def template_parts(template):
    """(before, after) the instruction in a template's prompt (data.ALPACA_TEMPLATE's form: format strings)."""
    mark = "\x00instruction\x00"
    try:
        prompt = template["prompt"].format(instruction=mark)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"the prompt template is not usable ({e.__class__.__name__}: {e}): expected a dict whose "
                         f"'prompt' is a format string with one {{instruction}}, as data.ALPACA_TEMPLATE") from None
    if prompt.count(mark) != 1:
        raise ValueError("the prompt template's 'prompt' must hold {instruction} exactly once")
    before, after = prompt.split(mark)
    if '"""' in before + after:
        raise ValueError('the prompt template holds """, which an Ollama Modelfile cannot quote')
    return before, after


def jinja_string(text):
    """text as a string literal that both Jinja engines read (Python's jinja2, llama.cpp's own: no \\u escapes)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return '"' + "".join(escapes.get(c, c) for c in text) + '"'


def chat_template(template):
    """tokenizer.chat_template (Jinja, as llama.cpp, LM Studio and transformers read it): a conversation as
    sample.py --chat folds it. Each user message is one instruction in the template, each answer is followed by
    <|endoftext|>, and the prompt already ends where the response begins. System messages are left out: the
    template's preamble is the system prompt the model was trained with."""
    before, after = template_parts(template)
    return ("{%- for message in messages -%}\n"
            "{%- if message['role'] == 'user' -%}\n"
            f"{{{{- {jinja_string(before)} + message['content'] + {jinja_string(after)} -}}}}\n"
            "{%- elif message['role'] == 'assistant' -%}\n"
            "{{- message['content'] + \"<|endoftext|>\" -}}\n"
            "{%- endif -%}\n"
            "{%- endfor -%}")


def ollama_template(template):
    """The same conversation in Ollama's Go-template syntax (its TEMPLATE); a model with no prompt template gets
    the text as it is."""
    if template is None:
        return "{{ .Prompt }}"
    before, after = template_parts(template)
    if "{{" in before + after:
        raise ValueError("the prompt template holds {{, which a Go template would read as an action")
    return ('{{- range .Messages }}\n'
            f'{{{{- if eq .Role "user" }}}}{before}{{{{ .Content }}}}{after}'
            '{{ else if eq .Role "assistant" }}{{ .Content }}<|endoftext|>{{ end }}\n'
            '{{- end }}')


def modelfile(gguf_name, template, block_size):
    """An Ollama Modelfile for the GGUF file gguf_name beside it."""
    return "\n".join([
        f"# ollama create mymodel -f {Path(gguf_name).stem}.Modelfile   (written by nanoFT's gguf_export.py)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{ollama_template(template)}"""',
        'PARAMETER stop "<|endoftext|>"',
        f"PARAMETER num_ctx {block_size}",  # GPT-2 has no positions past its context: Ollama's default is longer
        f"PARAMETER temperature {SAMPLING['temperature']}",
        f"PARAMETER top_p {SAMPLING['top_p']}",
        f"PARAMETER top_k {SAMPLING['top_k']}",
        "PARAMETER repeat_penalty 1.0",  # as sample.py: no penalty (Ollama's default is 1.1)
        ""])


# ----------------------------------------------------------------------------- tensors under llama.cpp's names

def gguf_tensors(model):
    """[(llama.cpp's name, tensor)] of a GPT. Our nn.Linear weights are (out, in), which is the layout llama.cpp wants
    (GGUF lists dimensions fastest first: (in, out)); Hugging Face's Conv1D (in, out) would need the transpose."""
    c = model.config

    def bias(module, size):  # llama.cpp's gpt2 needs every bias; a model built with bias=False has zeros
        return module.bias if module.bias is not None else torch.zeros(size)
    tensors = [("token_embd.weight", model.wte.weight), ("position_embd.weight", model.wpe.weight)]
    for i, block in enumerate(model.h):
        for name, module, size in (("attn_norm", block.ln_1, c.n_embd), ("attn_qkv", block.attn.c_attn, 3 * c.n_embd),
                                   ("attn_output", block.attn.c_proj, c.n_embd), ("ffn_norm", block.ln_2, c.n_embd),
                                   ("ffn_up", block.mlp.c_fc, 4 * c.n_embd), ("ffn_down", block.mlp.c_proj, c.n_embd)):
            tensors += [(f"blk.{i}.{name}.weight", module.weight), (f"blk.{i}.{name}.bias", bias(module, size))]
    tensors += [("output_norm.weight", model.ln_f.weight), ("output_norm.bias", bias(model.ln_f, c.n_embd))]
    if model.lm_head.weight is not model.wte.weight:  # an untied head (a merged LoRA head); else llama.cpp ties it
        tensors.append(("output.weight", model.lm_head.weight))
    return [(name, t.detach()) for name, t in tensors]


def ggml_type(name, t, dtype):
    """What llama.cpp's converter keeps in f32: vectors (norms, biases) and the position embeddings. A matrix whose
    rows are no whole number of q8_0 blocks falls back to f16, as there."""
    if t.dim() == 1 or name == "position_embd.weight":
        return GGML_F32
    if DTYPES[dtype][0] == GGML_Q8_0 and t.shape[-1] % QK8_0:
        return GGML_F16
    return DTYPES[dtype][0]


def nbytes(t, kind):
    n = t.numel()
    return {GGML_F32: 4 * n, GGML_F16: 2 * n, GGML_Q8_0: n // QK8_0 * (2 + QK8_0)}[kind]


def quantize_q8_0(w):
    """(scales, q) of llama.cpp's q8_0 for a float tensor whose last dimension is a multiple of 32: one f16 scale
    d = max|x| / 127 per block of 32 weights and q = round(x / d) in int8. d is rounded up to an f16 and q rounded
    with that stored d, so |q| <= 127 and every weight is within half a step of what llama.cpp computes:
    |x - q * d| <= d / 2 (llama.cpp's own quantizer rounds with the f32 d and stores it rounded to nearest)."""
    blocks = w.reshape(-1, QK8_0).float()
    exact = blocks.abs().amax(dim=1) / 127
    scales = exact.half()
    scales = (scales.view(torch.int16) + (scales.float() < exact)).view(torch.float16)  # the next f16 up
    d = scales.float()[:, None]
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1.0)), 0.0)
    return scales, q.to(torch.int8)


def tensor_bytes(name, t, kind, rows=4096):
    """The bytes of t as ggml type kind, a few thousand rows at a time (a big embedding is never copied whole)."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t[None]
    for start in range(0, t.shape[0], rows):
        part = t[start:start + rows].to("cpu", torch.float32)
        if not torch.isfinite(part).all():
            raise ValueError(f"the model's {name} holds NaN or infinite weights: there is nothing sound to export")
        if kind == GGML_F32:
            yield part.numpy().tobytes()
        elif kind == GGML_F16:
            if part.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"the model's {name} holds weights too large for f16: export with dtype f32")
            yield part.half().numpy().tobytes()
        else:  # q8_0: each block is its f16 scale, then its 32 int8 weights
            if part.abs().max() / 127 > torch.finfo(torch.float16).max:
                raise ValueError(f"the model's {name} holds weights too large for q8_0's f16 scales: export as f32")
            scales, q = quantize_q8_0(part)
            blocks = np.concatenate([scales.numpy().view(np.uint8).reshape(-1, 2), q.numpy().view(np.uint8)], axis=1)
            yield blocks.tobytes()


# ----------------------------------------------------------------------------- the GGUF file

def gguf_string(text):
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def gguf_value(kind, value):
    if kind == STRING:
        return gguf_string(value)
    if isinstance(kind, tuple):  # (ARRAY, element type)
        element = kind[1]
        head = struct.pack("<IQ", element, len(value))
        if element == STRING:
            return head + b"".join(map(gguf_string, value))
        return head + np.asarray(value, dtype=PACK[element]).tobytes()
    return struct.pack(PACK[kind], value)


def gguf_header(metadata, tensors):
    """Everything before the tensors' bytes: magic, version 3, counts, metadata, the tensor table, padding.
    tensors: [(name, shape as torch has it, ggml type, byte size)]."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, kind, value in metadata:
        type_id = ARRAY if isinstance(kind, tuple) else kind
        out += [gguf_string(key), struct.pack("<I", type_id), gguf_value(kind, value)]
    offset = 0
    for name, shape, kind, size in tensors:
        dims = list(reversed(shape))  # ggml counts dimensions from the fastest-varying one
        out += [gguf_string(name), struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)]
        offset += size + padding(size)
    head = b"".join(out)
    return head + bytes(padding(len(head)))


def padding(n):
    return -n % ALIGNMENT


def model_metadata(model, dtype, name):
    c = model.config
    return [("general.architecture", STRING, "gpt2"),
            ("general.name", STRING, name),
            ("general.file_type", U32, DTYPES[dtype][1]),
            ("general.quantization_version", U32, 2),  # GGML_QNT_VERSION: the q8_0 layout of today's ggml
            ("gpt2.context_length", U32, c.block_size),
            ("gpt2.embedding_length", U32, c.n_embd),
            ("gpt2.feed_forward_length", U32, 4 * c.n_embd),
            ("gpt2.block_count", U32, c.n_layer),
            ("gpt2.attention.head_count", U32, c.n_head),
            ("gpt2.attention.layer_norm_epsilon", F32, 1e-5),  # model.py's LayerNorms, as GPT-2's
            ("general.sampling.temp", F32, SAMPLING["temperature"]),  # llama.cpp's defaults for this model
            ("general.sampling.top_p", F32, SAMPLING["top_p"]),
            ("general.sampling.top_k", I32, SAMPLING["top_k"])]


# ----------------------------------------------------------------------------- export_gguf

def check_export(path, dtype, overwrite=False):
    """Raise a ValueError on what would stop an export to path, before any work: the dtype, the name, a file there."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype '{dtype}' is not supported: choose one of {', '.join(DTYPES)}")
    if path.suffix != ".gguf":
        raise ValueError(f"the GGUF file's name '{path}' must end in .gguf (e.g. model.gguf)")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the GGUF file's name, e.g. {path / 'model.gguf'}")
    for existing in (path, modelfile_path(path)):
        if existing.exists() and not overwrite:
            raise ValueError(f"{existing} already exists: choose another name, or overwrite it (overwrite=True, "
                             f"--overwrite=True)")


def modelfile_path(path):
    return Path(path).with_suffix(".Modelfile")


def export_gguf(model, path, dtype="f16", template=None, overwrite=False):
    """Write model (model.py's GPT, LoRA merged) as a GGUF file llama.cpp loads as arch 'gpt2', with GPT-2's tokenizer
    and, given a prompt template (load_model's info["template"]), a chat template; and an Ollama Modelfile beside it
    (model.gguf -> model.Modelfile). dtype: f32, f16 or q8_0 (8-bit blocks of 32 weights, one f16 scale each).
    Both files go to temporary names first and are renamed when complete. Returns the two paths."""
    path = Path(path)
    check_export(path, dtype, overwrite)
    check_model(model)
    metadata = model_metadata(model, dtype, path.stem) + tokenizer_metadata(model.config.vocab_size)
    if template is not None:
        metadata.append(("tokenizer.chat_template", STRING, chat_template(template)))
    recipe = modelfile(path.name, template, model.config.block_size)  # a bad template fails before any writing
    tensors = [(name, t, ggml_type(name, t, dtype)) for name, t in gguf_tensors(model)]
    table = [(name, list(t.shape), kind, nbytes(t, kind)) for name, t, kind in tensors]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, with_progress(gguf_header(metadata, table), tensors, f"{path.name} ({dtype})"))
        atomic_write(modelfile_path(path), [recipe.encode()])
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    return path, modelfile_path(path)


def check_model(model):
    if not isinstance(model, GPT):
        if hasattr(model, "gpt") and hasattr(model, "head"):
            raise ValueError("a text classifier (classify.py) is not a language model: GGUF runtimes generate text, "
                             "so only a GPT-2 with its language-model head can be exported")
        raise ValueError(f"export_gguf takes model.py's GPT, not a {type(model).__name__}")
    names = model.state_dict().keys()
    if any(".lora_" in name for name in names):
        raise ValueError("export_gguf needs a plain GPT-2: merge the LoRA adapters first (merge_lora in lora.py)")
    if any(t.dtype == torch.int8 for t in model.state_dict().values()):
        raise ValueError("this model's weights are int8 (quantize_int8): export the float model; dtype='q8_0' "
                         "quantizes it for llama.cpp")
    if model.config.vocab_size < VOCAB:
        raise ValueError(f"the model has {model.config.vocab_size} token rows, fewer than GPT-2's tokenizer has "
                         f"({VOCAB}): its tokens would not match")


def with_progress(header, tensors, desc):
    """The file's chunks: the header, then each tensor's bytes padded to the alignment; progress on stderr."""
    yield header
    total = sum(nbytes(t, kind) for _, t, kind in tensors)
    done, start = 0, time.time()
    shown = start  # a file written in under half a second shows nothing
    for name, t, kind in tensors:
        for chunk in tensor_bytes(name, t, kind):
            yield chunk
            done += len(chunk)
            if time.time() - shown > 0.5:
                rate = done / (time.time() - start)
                print(f"\rwriting {desc}: {done / 1e6:.0f}/{total / 1e6:.0f} MB ({100 * done / total:.0f}%), "
                      f"ETA {(total - done) / rate:.0f}s", end="", file=sys.stderr, flush=True)
                shown = time.time()
        yield bytes(padding(nbytes(t, kind)))
    if shown > start:
        print(f"\rwriting {desc}: {total / 1e6:.0f} MB in {time.time() - start:.0f}s" + " " * 20, file=sys.stderr)
