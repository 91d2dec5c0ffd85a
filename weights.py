"""
The files GPT-2's weights come in, read and written without their packages, every header treated as hostile
until checked: safetensors (Hugging Face's format; memory-mapped, no copy until a tensor is used) and llm.c's
.bin checkpoints. load_gpt2.py maps what they hold into model.py.

    tensors = read_safetensors("model.safetensors")     # {name: tensor}
    config, tensors = read_llmc("gpt2_124M.bin")         # llm.c's header, and its tensors under model.py's names
"""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

MAX_HEADER = 100_000_000  # a safetensors header larger than this is not a real one


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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path} is not a valid safetensors file: header is not JSON ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n, shape=(data_size,)) if data_size else None
    tensors, entries = {}, {name: _check_entry(path, name, info, data_size) for name, info in header.items()}
    ranges = sorted((start, end, name) for name, (_, _, _, (start, end)) in entries.items() if end > start)
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:  # each tensor's bytes are its own: no two may share any
            raise ValueError(f"{path} is not a valid safetensors file: tensors '{first}' and '{second}' overlap")
    for name, (np_dtype, torch_dtype, shape, (start, end)) in entries.items():
        array = data[start:end].view(np_dtype).reshape(shape) if end > start else np.zeros(shape, np_dtype)
        tensors[name] = torch.from_numpy(array).view(torch_dtype)
    return tensors


def _check_entry(path, name, info, data_size):
    def bad(why):
        return ValueError(f"{path} is not a valid safetensors file: tensor '{name}' {why}")
    if not isinstance(info, dict):
        raise bad("has no description")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
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
    atomic_write(path, [len(head).to_bytes(8, "little"), head, *blobs])


def atomic_write(path, chunks):
    """Write chunks (bytes) to path through a temp file and a rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def temp_beside(path):
    """(fd, name) of a new temp file beside path, unique, with the permissions a plain open() would give it
    (mkstemp makes it owner-only, and the renamed file would stay so: unreadable to a server running as
    another user)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~UMASK)
    return fd, tmp


UMASK = os.umask(0o022)  # read once, at import, and put back at once: os.umask can only be read by setting it
os.umask(UMASK)


def read_json(path, limit=10_000_000):
    """The JSON in a (small) file; a ValueError for anything that is not, including nesting too deep to parse."""
    if Path(path).stat().st_size > limit:
        raise ValueError(f"{path} is over {limit:,} bytes, too large for what it should hold")
    try:
        return json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e.__class__.__name__}: {first_line(e)})") from None


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0]


# ----------------------------------------------------------------------------- llm.c

LLMC_MAGIC = 20240326  # llm.c's GPT-2 checkpoint: gpt2_124M.bin, or what train_gpt2 writes
LLMC_VERSIONS = {3: (np.float32, torch.float32), 5: (np.uint16, torch.bfloat16)}  # float32 or bf16, padded vocab
LLMC_LAYERS = [  # after wte (Vp, C) and wpe (T, C): each tensor of every layer, stacked, in this order
    ("ln_1.weight", lambda C: (C,)), ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (3 * C, C)), ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)), ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)), ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (4 * C, C)), ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (C, 4 * C)), ("mlp.c_proj.bias", lambda C: (C,)),
]


def read_llmc(path):
    """({block_size, vocab_size, n_layer, n_head, n_embd}, {name: tensor}) of an llm.c checkpoint: a 256-int32
    header (magic 20240326, version 3 = float32 or 5 = bf16, T, V, L, NH, C, padded V), then every parameter in a
    fixed order, nn.Linear's (out, in) layout, wte padded to the larger vocabulary (the padding rows are dropped
    here). The header is hostile until checked: its sizes must account for the file's length exactly."""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=256) if size >= 1024 else np.zeros(0)
    if len(header) < 8 or header[0] != LLMC_MAGIC:
        raise ValueError(f"{path} is not an llm.c checkpoint (no header with magic number {LLMC_MAGIC})")
    version, T, V, L, NH, C, Vp = (int(x) for x in header[1:8])
    if version not in LLMC_VERSIONS:
        raise ValueError(f"{path} is an llm.c checkpoint of version {version}; readable: 3 (float32) and 5 (bf16)")
    if not all(0 < x <= 1_000_000 for x in (T, V, L, NH, C)) or not V <= Vp <= 2 * V or C % NH:
        raise ValueError(f"{path} has an llm.c header with impossible sizes: T={T} V={V} L={L} NH={NH} C={C} Vp={Vp}")
    np_dtype, torch_dtype = LLMC_VERSIONS[version]
    shapes = [("wte.weight", (Vp, C)), ("wpe.weight", (T, C))]
    shapes += [(f"h.{i}.{name}", shape(C)) for name, shape in LLMC_LAYERS for i in range(L)]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    count = sum(math.prod(shape) for _, shape in shapes)
    expected = 1024 + count * np.dtype(np_dtype).itemsize
    if size != expected:
        raise ValueError(f"{path} is {size:,} bytes, but its llm.c header (L={L}, C={C}, Vp={Vp}, T={T}) calls for "
                         f"{expected:,}: it is cut short or not what it claims")
    data = np.memmap(path, dtype=np_dtype, mode="c", offset=1024, shape=(count,))
    tensors, start = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        tensors[name] = torch.from_numpy(data[start:start + n].reshape(shape)).view(torch_dtype)
        start += n
    tensors["wte.weight"] = tensors["wte.weight"][:V]  # the rows past GPT-2's vocabulary are padding
    return {"block_size": T, "vocab_size": V, "n_layer": L, "n_head": NH, "n_embd": C}, tensors
