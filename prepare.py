"""
Turn a dataset into tokenized, ready-to-train splits in data/NAME/: downloaded once, cleaned, split, tokenized.

    python prepare.py --dataset=instruction-data   # 1,100 Alpaca-format examples ("Build a LLM from scratch" ch07)
    python prepare.py --dataset=alpaca             # Stanford Alpaca, 52,002 examples
    python prepare.py --dataset=medquad            # MedQuAD medical questions and answers, as Alpaca records
    python prepare.py --dataset=spam               # SMS Spam Collection, balanced ham/spam classification
    python prepare.py --dataset=path/or/url/mine.jsonl
        # your own: .json/.jsonl of Alpaca records, .csv/.tsv with label and text columns, or .txt (plain text)

finetune.py and classify.py call prepare() themselves. data/NAME/ keeps the raw download and, per split,
{split}.tokens.npy (uint16 ids of all examples, concatenated), {split}.offsets.npy (int64, N+1: example i is
tokens[offsets[i]:offsets[i + 1]]), {split}.prompt_len.npy (int32, instruction sets) or {split}.labels.npy
(int64, classification) and {split}.jsonl (the records; not for plain text). meta.json (counts, skips and
why, token statistics, seed, source, sha256, template) is written last: a folder without it is no dataset.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from itertools import chain
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import requests

from data import ALPACA_TEMPLATE, EOT, encode_batch, format_prompt, read_meta
from download import DownloadError, download, sha256_of
from corpus import documents, is_text_records, record_texts, text_files, tokenize_corpus
from readers import Skips, decode, read_records
from weights import atomic_write

# -----------------------------------------------------------------------------
dataset = "alpaca"  # alpaca, instruction-data, medquad, spam, or a path/URL to a .json/.jsonl/.csv/.tsv/.txt
data_dir = "data"  # datasets are prepared into data_dir/NAME
seed = 1337  # shuffles the splits (and picks which ham messages spam keeps)
max_length = 1024  # examples with more tokens than this are dropped, or cut with truncate=True
truncate = False  # True: cut examples longer than max_length instead of dropping them
shard_tokens = 100_000_000  # text datasets: tokens per shard file (uint16: 200 MB)
val_fraction = 0.1  # text datasets: about this share of the text, taken from its start, is the val split
alpaca_url = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"  # or a mirror
instruction_data_url = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"  # ch07's file
                        "ch07/01_main-chapter-code/instruction-data.json")
medquad_url = "https://github.com/abachaa/MedQuAD/archive/refs/heads/master.zip"  # or a Kaggle medquad.csv
spam_url = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"  # UCI's zip (sha256 checked)
# -----------------------------------------------------------------------------

BUILTIN = {"alpaca": "instruction", "instruction-data": "instruction", "medquad": "instruction",
           "spam": "classification"}
SUFFIX_KIND = {".json": "instruction", ".jsonl": "instruction", ".csv": "classification",
               ".tsv": "classification", ".txt": "text"}
SPLITS = {  # two splits of int(fraction * n) examples each, then the one that gets the rest
    "instruction": (("train", 0.85), ("test", 0.10), "val"),  # ch07: 935/110/55 of 1,100
    "classification": (("train", 0.70), ("val", 0.10), "test"),  # ch06: 1,045/149/300 of 1,494
}
MAX_DOWNLOAD = 1 << 30  # a dataset file read whole (JSON, CSV, zip) must be under 1 GB, so may its download
MAX_TEXT_DOWNLOAD = 1 << 36  # a text corpus (.txt, .jsonl) is streamed; its download may be up to 64 GB
KNOWN_SHA256 = {  # only files that never change upstream (a GitHub branch's files and archives may)
    spam_url: "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3",
}
# ----------------------------------------------------------------------------- where the data comes from

def is_url(source):
    """Whether a dataset names a URL; a scheme other than http(s) is refused (a path has none)."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(source))
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise ValueError(f"{source}: only http:// and https:// URLs can be downloaded; for anything else, fetch the "
                         f"file yourself and give its path")
    return bool(scheme)


def safe_name(text, fallback="dataset"):
    """text as one safe path component: letters, digits, '.', '_' and '-' only, never '.' or '..' or hidden."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")[:100] or fallback


def resolve(dataset, urls=None):
    """(name, kind, source) of a built-in dataset or of a path/URL to a file (or a folder of text files) of your
    own (NAME: its stem, made a safe folder name). A .json/.jsonl file may turn out to hold text records (kind
    'text') once it is read: see kind_of."""
    if dataset in BUILTIN:
        defaults = {"alpaca": alpaca_url, "instruction-data": instruction_data_url, "medquad": medquad_url,
                    "spam": spam_url}
        name, kind, source = dataset, BUILTIN[dataset], {**defaults, **(urls or {})}[dataset]
    elif not is_url(dataset) and Path(dataset).expanduser().is_dir():
        source = str(Path(dataset).expanduser().resolve())
        name, kind = safe_name(Path(source).name), "text"
    else:
        source = dataset
        file = PurePosixPath(urlparse(source).path) if is_url(source) else Path(source)
        if file.suffix.lower() not in SUFFIX_KIND:
            raise ValueError(f"unknown dataset '{dataset}': use one of {', '.join(BUILTIN)}, or a path or URL to a "
                             f".json/.jsonl (Alpaca records, or text records), .csv/.tsv (label and text columns) or "
                             f".txt file, or a folder of .txt/.jsonl files")
        name, kind = safe_name(file.stem), SUFFIX_KIND[file.suffix.lower()]
        if name in BUILTIN:
            raise ValueError(f"{source} would be prepared into data/{name}, the folder of the built-in dataset "
                             f"'{name}': rename the file")
    return name, kind, source if is_url(source) else str(Path(source).expanduser().resolve())


def dataset_name(dataset, urls=None):
    """The folder name (data/NAME) a dataset is prepared into."""
    return resolve(dataset, urls)[0]


def kind_of(kind, raw):
    """The kind of data raw holds: a .json/.jsonl file of {"text": ...} records is text, not instructions."""
    if kind == "instruction" and raw.suffix.lower() in (".json", ".jsonl") and is_text_records(raw):
        return "text"
    return kind


def fetch(source, folder, name):
    """The raw file: a local path is read in place, a URL is downloaded once into folder/download/ (apart from
    the prepared files, whatever the URL's file is called) and kept there, parsed before it is kept."""
    if not is_url(source):
        if not Path(source).exists():
            raise FileNotFoundError(f"dataset file {source} does not exist")
        return Path(source)
    file = PurePosixPath(urlparse(source).path)
    if not file.name:
        raise ValueError(f"{source} does not name a file: give the URL of the dataset file itself")
    dest = folder / "download" / (safe_name(file.stem, "file") + file.suffix.lower())
    came_from = dest.with_name(dest.name + ".url")  # the URL the file (or its .part) came from
    if came_from.exists() and came_from.read_text() != source:  # another URL's file of the same name: not this one
        for old in (dest, dest.with_name(dest.name + ".part"), came_from):
            old.unlink(missing_ok=True)
    text = SUFFIX_KIND.get(file.suffix.lower()) == "text" or file.suffix.lower() == ".jsonl"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        came_from.write_text(source)
        return download(source, dest, sha256=KNOWN_SHA256.get(source), desc=file.name,
                        check=lambda part: check_parses(name, dest, part),
                        max_bytes=MAX_TEXT_DOWNLOAD if text else MAX_DOWNLOAD)
    except requests.RequestException as e:
        raise DownloadError(f"could not download {source} ({e.__class__.__name__}: {e})") from None


def check_parses(name, as_named, part):
    """A ValueError unless the downloaded file (at part, to be named as_named) holds at least one record."""
    if as_named.suffix.lower() == ".txt":
        with open(part, "rb") as f:
            decode(f.read(1 << 20).rsplit(b"\n", 1)[0] or b" ", as_named.name)  # UTF-8, as far as a whole line goes
        return
    if as_named.suffix.lower() in (".json", ".jsonl") and is_text_records(part):
        if next(record_texts(part, {}, as_named.suffix.lower() == ".jsonl"), None) is None:
            raise ValueError("it holds no record with a text")
        return
    skips, counts = Skips(), Counter()
    skips.shown = 0  # quiet: the records are read (and skips shown) again when the dataset is prepared
    if not read_records(name, part, skips, counts, suffix=as_named.suffix):
        raise ValueError(f"it holds no usable record (skipped: {dict(skips) or 'none'})")


# ----------------------------------------------------------------------------- tokens and splits

def encode_instructions(records):
    """Each record as prompt tokens + response tokens + <|endoftext|>, with its prompt length. The prompt is
    encoded on its own, as sample.py will encode it, so training sees the ids that generation starts from."""
    eot = np.array([EOT], np.uint32)  # an id: no text can forge it
    ids = encode_batch([format_prompt(r["instruction"], r["input"]) for r in records] +
                       [r["output"] for r in records])
    return [{"record": r, "tokens": np.concatenate([prompt, output, eot]), "prompt_len": len(prompt)}
            for r, prompt, output in zip(records, ids[:len(records)], ids[len(records):])]


def encode_labelled(records, labels):
    ids, label_id = encode_batch([r["text"] for r in records]), {label: i for i, label in enumerate(labels)}
    return [{"record": r, "tokens": tokens, "label": label_id[r["label"]]} for r, tokens in zip(records, ids)]


def fit(examples, max_length, truncate, skips, counts):
    """The examples of at most max_length tokens; longer ones are dropped, or cut if truncate is set (but an
    example cut inside its prompt, with no response left to learn, is dropped)."""
    kept = []
    for e in examples:
        n = len(e["tokens"])
        if n > max_length and (not truncate or e.get("prompt_len", 0) >= max_length):
            skips.add(f"longer than max_length={max_length}", f"{n} tokens: {e['record']}")
        else:
            counts["truncated"] += n > max_length
            kept.append({**e, "tokens": e["tokens"][:max_length]})
    return kept


def balance(records, rng, counts):
    """Downsample every label to the count of the rarest (spam: 4,827 ham to 747), rng choosing which."""
    by_label = {}
    for i, record in enumerate(records):
        by_label.setdefault(record["label"], []).append(i)
    n = min(len(idx) for idx in by_label.values())
    keep = sorted(chain.from_iterable(rng.choice(idx, size=n, replace=False) for idx in by_label.values()))
    counts["balanced"] = len(keep)
    return [records[i] for i in keep]


def make_splits(examples, kind, rng):
    """{split: examples}, shuffled and cut the LLMs-from-scratch way (int(fraction * n) for the first two
    splits, the rest for the third)."""
    (first, f1), (second, f2), rest = SPLITS[kind]
    order = rng.permutation(len(examples))
    a, b = int(f1 * len(examples)), int(f2 * len(examples))
    parts = {first: order[:a], second: order[a:a + b], rest: order[a + b:]}
    return {name: [examples[i] for i in parts[name]] for name in ("train", "val", "test")}


def token_stats(examples):
    lengths = np.array([len(e["tokens"]) for e in examples])
    return {"total": int(lengths.sum()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1),
            "p95": int(np.percentile(lengths, 95))}


# ----------------------------------------------------------------------------- writing and reading back

def write_split(folder, name, examples, kind):
    lengths = np.array([len(e["tokens"]) for e in examples], dtype=np.int64)
    tokens = np.concatenate([e["tokens"] for e in examples]) if examples else np.zeros(0)
    np.save(folder / f"{name}.tokens.npy", tokens.astype(np.uint16))  # GPT-2's 50,257 ids fit in 16 bits
    np.save(folder / f"{name}.offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    if kind == "instruction":
        np.save(folder / f"{name}.prompt_len.npy", np.array([e["prompt_len"] for e in examples], np.int32))
    if kind == "classification":
        np.save(folder / f"{name}.labels.npy", np.array([e["label"] for e in examples], np.int64))
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e["record"], ensure_ascii=False) + "\n" for e in examples)


def write_dataset(folder, splits, kind, meta):
    """Write everything into a temp folder, then move it into place with meta.json last: a folder without
    meta.json is not a dataset, so an interrupted prepare leaves the raw download and nothing half-done."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".prepare-"))
    try:
        for name, examples in splits.items():
            write_split(tmp, name, examples, kind)
        for file in tmp.iterdir():
            os.replace(file, folder / file.name)
        atomic_json(folder / "meta.json", meta)
    except OSError as e:
        raise OSError(f"could not write the prepared dataset into {folder} ({e.strerror or e}): it needs about "
                      f"{sum(f.stat().st_size for f in tmp.iterdir()) / 1e6:,.0f} MB and more; free some disk space "
                      f"or give another --data_dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the whole recipe

def prepare(dataset, data_dir="data", seed=1337, max_length=1024, truncate=False, urls=None,
            shard_tokens=100_000_000, val_fraction=0.1):
    """data_dir/NAME, holding dataset's tokenized splits: prepared now unless its meta.json is already there
    (then nothing is read or downloaded). urls overrides built-in datasets' sources: {"spam": url_or_path}."""
    name, kind, source = resolve(dataset, urls)
    folder = Path(data_dir).expanduser() / name
    asked = {"source": source, "seed": seed, "max_length": max_length, "truncate": truncate}
    asked_text = {"source": source, "shard_tokens": shard_tokens, "val_fraction": val_fraction}  # what text uses
    if (folder / "meta.json").exists():
        meta = read_meta(folder)
        changed = what_changed(meta, asked_text if meta.get("kind") == "text" else asked)
        if not changed:
            return folder
        print(f"note: {folder} was prepared with {changed}: preparing it again", file=sys.stderr)
        (folder / "meta.json").unlink()  # no longer a dataset until the new one is whole
    raw = fetch(source, folder, name)
    kind = kind_of(kind, raw)
    print(f"{name}: preparing {raw}")
    start, rng, skips, counts = time.time(), np.random.default_rng(seed), Skips(), Counter()
    if kind == "text":
        return prepare_text(name, raw, folder, asked_text, start)
    records = read_records(name, raw, skips, counts)
    if not records:
        raise ValueError(f"{source} has no valid record (skipped: {dict(skips) or 'none'})")
    extra = {}
    if kind == "instruction":
        examples = encode_instructions(records)
        extra["template"] = ALPACA_TEMPLATE
    else:
        extra["labels"] = sorted({r["label"] for r in records})
        counts["per_label"] = dict(Counter(r["label"] for r in records))
        records = balance(records, rng, counts) if name == "spam" else records
        examples = encode_labelled(records, extra["labels"])
    examples = fit(examples, max_length, truncate, skips, counts)
    if not examples:
        raise ValueError(f"every record of {source} is longer than max_length={max_length} tokens"
                         + (" even in its prompt alone" if truncate else "") + ": raise max_length"
                         + ("" if truncate else ", or set truncate=True"))
    counts["examples"] = len(examples)
    splits = make_splits(examples, kind, rng)
    meta = {"name": name, "kind": kind, **asked, "raw": raw.name, "sha256": fingerprint(raw), **stamp(raw),
            "tokenizer": "gpt2", "splits": {s: len(ex) for s, ex in splits.items()}, "skipped": dict(skips),
            "counts": dict(counts), "tokens": token_stats(examples), **extra}
    write_dataset(folder, splits, kind, meta)
    summarize(meta, time.time() - start, folder)
    return folder


def prepare_text(name, raw, folder, asked, start):
    """A text dataset: its documents tokenized into uint16 shards, the val split first (corpus.py). The shards
    are made in folder/.prepare-text, which an interrupted run leaves for the next to go on from, then moved
    into place with meta.json last."""
    files = text_files(raw)
    work, skips = folder / ".prepare-text", Counter()
    shard_tokens, val_fraction = asked["shard_tokens"], asked["val_fraction"]
    progress = tokenize_corpus(documents(files, skips), sum(f.stat().st_size for f in files), work, shard_tokens,
                               val_fraction, source_id=stamp(raw))
    shards = progress["shards"]
    splits = {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")}
    if not splits["train"] or not splits["val"]:
        raise ValueError(f"{raw} is too short to split: it gave {splits['val']} val and {splits['train']} train "
                         f"tokens; give more text (or another val_fraction)")
    meta = {"name": name, "kind": "text", **asked, "raw": raw.name, "sha256": fingerprint(raw), **stamp(raw),
            "tokenizer": "gpt2", "splits": splits, "shards": shards, "skipped": dict(skips),
            "counts": {"files": len(files), "documents": progress["documents"], "bytes": progress["bytes"]},
            "tokens": {"total": sum(splits.values())}}
    for old in folder.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].npy"):  # a former preparation's shards
        old.unlink()
    for shard in shards:
        os.replace(work / shard["file"], folder / shard["file"])
    atomic_json(folder / "meta.json", meta)
    shutil.rmtree(work, ignore_errors=True)
    summarize(meta, time.time() - start, folder)
    return folder


def source_files(raw):
    return sorted(p for p in raw.rglob("*") if p.is_file()) if raw.is_dir() else [raw]


def stamp(raw):
    """The size and modification time of a file (or a folder's files), to notice cheaply when it has changed."""
    stats = [f.stat() for f in source_files(raw)]
    return {"source_size": sum(s.st_size for s in stats), "source_mtime_ns": max((s.st_mtime_ns for s in stats),
                                                                                  default=0)}


def fingerprint(raw):
    """The sha256 of a file; of a folder, the sha256 of its files' names and sha256s."""
    if raw.is_file():
        return sha256_of(raw)
    return hashlib.sha256("".join(f"{f.relative_to(raw)}:{sha256_of(f)}\n" for f in source_files(raw)).encode()
                          ).hexdigest()


def what_changed(meta, asked):
    """Why a prepared dataset no longer fits what is asked (other settings, or a source file whose contents
    changed since), as text; '' when it still does."""
    differ = [f"{k}={meta.get(k)!r} (not {v!r})" for k, v in asked.items() if meta.get(k) != v]
    source = Path(asked["source"])
    if not differ and not is_url(asked["source"]) and source.exists():
        if {k: meta.get(k) for k in stamp(source)} != stamp(source) and fingerprint(source) != meta.get("sha256"):
            differ.append(f"an earlier version of {source.name} (its contents changed since)")
    return ", ".join(differ)


def atomic_json(path, value):
    """Write value as JSON through weights.atomic_write (a temp file, then a rename)."""
    atomic_write(path, [(json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")])


def summarize(meta, seconds, folder):
    t, text = meta["tokens"], meta["kind"] == "text"
    n, unit = (t["total"], "token") if text else (meta["counts"]["examples"], "example")
    print(f"  counts: {json.dumps(meta['counts'])}")
    print(f"  skipped: {json.dumps(meta['skipped']) if meta['skipped'] else 'none'}")
    if text:
        print(f"  {len(meta['shards'])} shards of up to {meta['shard_tokens']:,} tokens; {t['total']:,} tokens in all")
    else:
        print(f"  tokens per example: max {t['max']:,}, mean {t['mean']:,}, p95 {t['p95']:,}; {t['total']:,} in all")
    print(f"  {unit}s per split: " + ", ".join(f"{s} {k:,}" for s, k in meta["splits"].items()) + f" -> {folder}")
    print(f"  prepared {n:,} {unit}s in {seconds:.2f}s ({n / max(seconds, 1e-9):,.0f} {unit}s/s)")


def check_settings(c):
    """Impossible values, found before anything is read or downloaded."""
    from configurator import seed_problems
    problems = seed_problems(c["seed"])
    problems += [f"{k}={c[k]} must be at least 1" for k in ("max_length", "shard_tokens") if c[k] < 1]
    if not 0 < c["val_fraction"] < 1:
        problems.append(f"val_fraction={c['val_fraction']} must be between 0 and 1")
    return problems


if __name__ == "__main__":
    from configurator import checked, configure, fail
    config = configure(globals())
    c = checked(config, check_settings(config))
    try:
        folder = prepare(c.dataset, c.data_dir, c.seed, c.max_length, c.truncate, None, c.shard_tokens, c.val_fraction)
        print(f"ready: {folder}")
    except (ValueError, OSError, DownloadError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: nothing half-prepared was kept (a text corpus keeps its finished shards for next time)", 130)
