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

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import requests
import tiktoken

from load_gpt2 import DownloadError, download

# -----------------------------------------------------------------------------
dataset = "alpaca"  # alpaca, instruction-data, medquad, spam, or a path/URL to a .json/.jsonl/.csv/.tsv/.txt
data_dir = "data"
seed = 1337  # shuffles the splits (and picks which ham messages spam keeps)
max_length = 1024  # examples with more tokens than this are dropped, or cut with truncate=True
truncate = False
alpaca_url = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
instruction_data_url = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                        "ch07/01_main-chapter-code/instruction-data.json")
medquad_url = "https://github.com/abachaa/MedQuAD/archive/refs/heads/master.zip"  # or a Kaggle medquad.csv
spam_url = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# -----------------------------------------------------------------------------

ALPACA_TEMPLATE = {  # the prompt of "Build a LLM from scratch" ch07; the response follows it directly
    "prompt": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    "prompt_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n"),
}
BUILTIN = {"alpaca": "instruction", "instruction-data": "instruction", "medquad": "instruction",
           "spam": "classification"}
SUFFIX_KIND = {".json": "instruction", ".jsonl": "instruction", ".csv": "classification",
               ".tsv": "classification", ".txt": "text"}
SPLITS = {  # two splits of int(fraction * n) examples each, then the one that gets the rest
    "instruction": (("train", 0.85), ("test", 0.10), "val"),  # ch07: 935/110/55 of 1,100
    "classification": (("train", 0.70), ("val", 0.10), "test"),  # ch06: 1,045/149/300 of 1,494
    "text": (("train", 0.90), ("val", 0.10), None),  # nanoGPT's shakespeare: one stream, cut, not shuffled
}
KNOWN_SHA256 = {  # only files that never change upstream (a GitHub branch's files and archives may)
    spam_url: "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3",
}
MAX_MEMBER_BYTES = 1 << 28  # a zip member larger than this (256 MB) is refused: no real dataset file is near it


def format_prompt(instruction, input="", template=ALPACA_TEMPLATE):
    """The text the model sees before its response; the Input section only appears when there is input."""
    if input:
        return template["prompt_input"].format(instruction=instruction, input=input)
    return template["prompt"].format(instruction=instruction)


def encode_batch(texts):
    """The token ids (uint32 arrays) of many texts, on all cores. Each thread encodes a chunk of texts:
    tiktoken's encode_ordinary_batch makes one task per text and ran slower than one thread here."""
    enc, threads = tiktoken.get_encoding("gpt2"), os.cpu_count() or 1
    size = max(1, -(-len(texts) // (4 * threads)))
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]

    def encode(chunk):  # nothing allowed, nothing disallowed: a literal "<|endoftext|>" stays plain text
        return [enc.encode_to_numpy(text, disallowed_special=()) for text in chunk]
    with ThreadPoolExecutor(threads) as pool:
        return list(chain.from_iterable(pool.map(encode, chunks)))


class Skips(Counter):
    """Records left out, counted by reason; the first few of each are printed so a bad file is easy to fix."""
    shown = 3

    def add(self, reason, example):
        self[reason] += 1
        if self[reason] <= self.shown:
            print(f"  skipped ({reason}): {str(example)[:160]!r}")


# ----------------------------------------------------------------------------- where the data comes from

def is_url(source):
    return str(source).startswith(("http://", "https://"))


def resolve(dataset, urls=None):
    """(name, kind, source) of a built-in dataset or of a path/URL to a file of your own (NAME = its stem)."""
    if dataset in BUILTIN:
        defaults = {"alpaca": alpaca_url, "instruction-data": instruction_data_url, "medquad": medquad_url,
                    "spam": spam_url}
        name, kind, source = dataset, BUILTIN[dataset], {**defaults, **(urls or {})}[dataset]
    else:
        source = dataset
        file = PurePosixPath(urlparse(source).path) if is_url(source) else Path(source)
        if file.suffix.lower() not in SUFFIX_KIND:
            raise ValueError(f"unknown dataset '{dataset}': use one of {', '.join(BUILTIN)}, or a path or URL "
                             f"to a .json/.jsonl (Alpaca records), .csv/.tsv (label and text columns) or .txt file")
        name, kind = file.stem, SUFFIX_KIND[file.suffix.lower()]
        if name in BUILTIN:
            raise ValueError(f"{source} would be prepared into data/{name}, the folder of the built-in dataset "
                             f"'{name}': rename the file")
    return name, kind, source if is_url(source) else str(Path(source).expanduser().resolve())


def fetch(source, folder):
    """The raw file: a local path is read in place, a URL is downloaded once into folder and kept there."""
    if not is_url(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"dataset file {source} does not exist")
        return Path(source)
    filename = PurePosixPath(urlparse(source).path).name
    if not filename:
        raise ValueError(f"{source} does not name a file: give the URL of the dataset file itself")
    try:
        return download(source, folder / filename, sha256=KNOWN_SHA256.get(source), desc=filename)
    except requests.RequestException as e:
        raise DownloadError(f"could not download {source} ({e.__class__.__name__}: {e})") from None


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def decode(data, where):
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, if any, is not part of the data
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e}): convert it to UTF-8 and try again") from None
    if not text.strip():
        raise ValueError(f"{where} is empty: if it was downloaded, delete it and run again")
    return text


def read_text(path):
    return decode(Path(path).read_bytes(), path)


def zip_members(path, skips, keep):
    """(name, bytes) of the zip's files for which keep(name) holds, read in memory and never extracted.
    Names that would escape an extraction folder are refused anyway, and so is anything bomb-sized."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir() or not keep(info.filename):
                    continue
                if unsafe_name(info.filename):
                    skips.add("unsafe member name", info.filename)
                    continue
                if info.file_size > MAX_MEMBER_BYTES:  # zipfile never inflates past the declared size
                    skips.add(f"member larger than {MAX_MEMBER_BYTES:,} bytes", info.filename)
                    continue
                yield info.filename, z.read(info)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable zip file ({e}): if it was downloaded, delete it and "
                         f"run again") from None


def unsafe_name(name):
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or (len(parts) > 0 and ":" in parts[0])


# ----------------------------------------------------------------------------- reading records

def read_records(name, raw, skips, counts):
    """The dataset's records, {instruction, input, output} or {text, label} dicts; bad ones are skipped."""
    suffix = raw.suffix.lower()
    if name == "medquad" and suffix == ".csv":  # Kaggle's medquad.csv: question, answer, source, focus_area
        return medquad_records(columns(csv_rows(raw), ("question", "answer"), raw, skips), skips, counts)
    if name == "medquad":
        return medquad_records(medquad_zip_pairs(raw, skips, counts), skips, counts)
    if name == "spam":
        return read_sms(raw, skips, counts)
    if suffix in (".json", ".jsonl"):
        return read_instructions(raw, skips, counts)
    return labelled(csv_rows(raw) if suffix == ".csv" else tsv_rows(read_text(raw)), raw, skips, counts)


def read_instructions(path, skips, counts):
    """Alpaca records from a .json list or a .jsonl file (one object a line)."""
    text = read_text(path)
    items = jsonl_items(text, skips) if path.suffix.lower() == ".jsonl" else json_items(text, path)
    counts["read"] = len(items) + skips["not JSON"]
    records = []
    for item in items:
        reason = invalid(item)
        if reason:
            skips.add(reason, item)
        else:
            records.append({"instruction": item["instruction"], "input": item.get("input", ""),
                            "output": item["output"]})
    return records


def json_items(text, path):
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): an instruction dataset is a JSON list of "
                         f"{{instruction, input, output}} records, or a .jsonl file of one a line") from None
    if not isinstance(items, list):
        raise ValueError(f"{path} holds a JSON {type(items).__name__}, not a list of records")
    return items


def jsonl_items(text, skips):
    items = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                skips.add("not JSON", f"line {n}: {e}: {line}")
    return items


def invalid(item):
    """Why item is not a usable Alpaca record, or None when it is."""
    if not isinstance(item, dict):
        return "not a JSON object"
    if "instruction" not in item or "output" not in item:
        return "no instruction or no output"
    fields = [item["instruction"], item.get("input", ""), item["output"]]
    if not all(isinstance(f, str) for f in fields):
        return "a field is not a string"
    if not item["instruction"].strip() or not item["output"].strip():
        return "empty instruction or output"
    try:
        "".join(fields).encode("utf-8")
    except UnicodeEncodeError:  # JSON's \ud800 escapes can make strings that are not Unicode text
        return "lone surrogate"
    return None


def csv_rows(path):
    try:  # the csv module, because quoted fields may hold commas and newlines
        return list(csv.reader(io.StringIO(read_text(path), newline="")))
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV file ({e})") from None


def tsv_rows(text, ncols=None):
    """Tab-separated rows, split by hand: a CSV reader would let a quote at the start of an SMS swallow the
    lines after it. Extra tabs stay in the last column (the text)."""
    lines = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    ncols = ncols or len(lines[0].split("\t"))
    return [line.split("\t", ncols - 1) for line in lines]


def columns(rows, names, where, skips):
    """The named columns of each row under the header rows[0] (names matched case-insensitively)."""
    header = [h.strip().lower() for h in rows[0]]
    if not set(names) <= set(header):
        raise ValueError(f"{where} needs a header row naming the columns {' and '.join(names)}; its first row "
                         f"is {rows[0]}")
    picked = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            skips.add(f"not {len(header)} columns", f"row {n}: {row}")
        else:
            picked.append([row[header.index(name)] for name in names])
    return picked


def labelled(rows, where, skips, counts):
    """{text, label} records of a table with a label and a text column."""
    counts["read"] = len(rows) - 1
    records = []
    for label, text in columns(rows, ("label", "text"), where, skips):
        if label.strip() and text.strip():
            records.append({"text": text, "label": label.strip()})
        else:
            skips.add("empty label or text", [label, text])
    return records


def read_sms(path, skips, counts):
    """The SMS Spam Collection: 'ham<TAB>text' or 'spam<TAB>text' lines, from the UCI zip or the bare file."""
    if zipfile.is_zipfile(path):
        member = [data for _, data in zip_members(path, skips, lambda n: n.endswith("SMSSpamCollection"))]
        if not member:
            raise ValueError(f"{path} has no SMSSpamCollection file: is it the UCI SMS Spam Collection zip?")
        text = decode(member[0], f"{path}:SMSSpamCollection")
    else:
        text = read_text(path)
    return labelled([["label", "text"]] + tsv_rows(text, ncols=2), path, skips, counts)


def medquad_zip_pairs(path, skips, counts):
    """(question, answer) of every <QAPair> in the XML files of MedQuAD's GitHub archive."""
    pairs, files = [], 0
    for name, data in zip_members(path, skips, lambda n: n.endswith(".xml")):
        root = parse_xml(data, name, skips)
        if root is not None:
            files += 1
            pairs += [(qa.findtext("Question") or "", qa.findtext("Answer") or "") for qa in root.iter("QAPair")]
    counts["xml_files"] = files
    return pairs


def parse_xml(data, name, skips):
    """The root element, or None for a file that is not UTF-8 XML or that declares a DTD: entity declarations
    are how XML bombs grow, and MedQuAD has none. (Parsing a str makes expat ignore whatever encoding the
    file claims, so this check sees what the parser sees.)"""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        skips.add("XML not UTF-8", name)
        return None
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        skips.add("XML declares a DTD (refused)", name)
        return None
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        skips.add("bad XML", f"{name}: {e}")
        return None


def medquad_records(pairs, skips, counts):
    """Alpaca records of the pairs with an answer (most answers were removed upstream, for copyright),
    whitespace normalised, exact duplicates dropped."""
    counts["read"] = counts["pairs"] = len(pairs)
    seen, records = set(), []
    for question, answer in pairs:
        question, answer = clean(question), clean(answer)
        if not answer or not question:
            skips.add("empty answer" if question else "empty question", question or answer)
        elif (question, answer) in seen:
            skips.add("duplicate", question)
        else:
            seen.add((question, answer))
            records.append({"instruction": question, "input": "", "output": answer})
    counts["non_empty"] = len(records) + skips["duplicate"]
    counts["duplicates"] = skips["duplicate"]
    return records


def clean(text):
    """Runs of spaces and tabs become one space; lines are stripped and blank ones dropped (paragraphs stay)."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


# ----------------------------------------------------------------------------- tokens and splits

def encode_instructions(records):
    """Each record as prompt tokens + response tokens + <|endoftext|>, with its prompt length. The prompt is
    encoded on its own, as sample.py will encode it, so training sees the ids that generation starts from."""
    eot = np.array([tiktoken.get_encoding("gpt2").eot_token], np.uint32)  # an id: no text can forge it
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


def encode_text(text):
    """A whole text, encoded in segments in parallel: cut before every line that starts with a non-space
    character, which gives exactly the ids of the text encoded in one piece (GPT-2's pre-tokenizer never
    joins a newline to the character after it)."""
    return [{"tokens": tokens} for tokens in encode_batch(re.split(r"(?<=\n)(?=\S)", text))]


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
    splits, the rest for the third). Plain text is one token stream, cut at 90% like nanoGPT's."""
    (first, f1), (second, f2), rest = SPLITS[kind]
    if kind == "text":
        tokens = np.concatenate([e["tokens"] for e in examples])
        cut = int(f1 * len(tokens))
        return {first: [{"tokens": tokens[:cut]}], second: [{"tokens": tokens[cut:]}]}
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
    if kind != "text":
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
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == "meta.json"):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(folder):
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (it has no meta.json): run prepare.py")
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(folder, split):
    """One prepared split, memory-mapped: 'tokens' and 'offsets' (example i is tokens[offsets[i]:offsets[i+1]])
    and 'prompt_len' (instruction sets) or 'labels' (classification)."""
    splits = read_meta(folder)["splits"]
    if split not in splits:
        raise ValueError(f"{folder} has no '{split}' split; it has {', '.join(splits)}")
    arrays = {}
    for key in ("tokens", "offsets", "prompt_len", "labels"):
        path = Path(folder) / f"{split}.{key}.npy"
        if path.exists():
            arrays[key] = np.load(path, mmap_mode="r")
    return arrays


def load_records(folder, split):
    """The records of a split, in the order of its examples (the reference outputs, the labels as text)."""
    with open(Path(folder) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the whole recipe

def prepare(dataset, data_dir="data", seed=1337, max_length=1024, truncate=False, urls=None):
    """data_dir/NAME, holding dataset's tokenized splits: prepared now unless its meta.json is already there
    (then nothing is read or downloaded). urls overrides built-in datasets' sources: {"spam": url_or_path}."""
    name, kind, source = resolve(dataset, urls)
    folder = Path(data_dir) / name
    if (folder / "meta.json").exists():
        meta, asked = read_meta(folder), {"source": source, "seed": seed, "max_length": max_length,
                                          "truncate": truncate}
        differ = [f"{k}={meta.get(k)!r} (not {v!r})" for k, v in asked.items() if meta.get(k) != v]
        if differ:
            print(f"note: {folder} was prepared with {', '.join(differ)}; delete it to prepare it again")
        return folder
    raw = fetch(source, folder)
    print(f"{name}: preparing {raw}")
    start, rng, skips, counts = time.time(), np.random.default_rng(seed), Skips(), Counter()
    extra = {}
    if kind == "text":
        examples = encode_text(read_text(raw))
    else:
        records = read_records(name, raw, skips, counts)
        if not records:
            raise ValueError(f"{source} has no valid record (skipped: {dict(skips) or 'none'})")
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
            raise ValueError(f"every record of {source} is longer than max_length={max_length} tokens: raise "
                             f"max_length, or set truncate=True")
    counts["examples"] = len(examples)
    splits = make_splits(examples, kind, rng)
    sizes = {s: len(ex) if kind != "text" else len(ex[0]["tokens"]) for s, ex in splits.items()}
    meta = {"name": name, "kind": kind, "source": source, "raw": raw.name, "sha256": sha256_of(raw),
            "seed": seed, "max_length": max_length, "truncate": truncate, "tokenizer": "gpt2",
            "splits": sizes, "skipped": dict(skips), "counts": dict(counts), "tokens": token_stats(examples),
            **extra}
    write_dataset(folder, splits, kind, meta)
    summarize(meta, time.time() - start, folder)
    return folder


def summarize(meta, seconds, folder):
    t, text = meta["tokens"], meta["kind"] == "text"
    n, unit = (t["total"], "token") if text else (meta["counts"]["examples"], "example")
    print(f"  counts: {json.dumps(meta['counts'])}")
    print(f"  skipped: {json.dumps(meta['skipped']) if meta['skipped'] else 'none'}")
    print(f"  tokens per {'segment' if text else 'example'}: max {t['max']:,}, mean {t['mean']:,}, "
          f"p95 {t['p95']:,}; {t['total']:,} in all")
    print(f"  {unit}s per split: " + ", ".join(f"{s} {k:,}" for s, k in meta["splits"].items()) + f" -> {folder}")
    print(f"  prepared {n:,} {unit}s in {seconds:.2f}s ({n / max(seconds, 1e-9):,.0f} {unit}s/s)")


if __name__ == "__main__":
    from configurator import configure, fail
    configure(globals())
    try:
        print(f"ready: {prepare(dataset, data_dir, seed, max_length, truncate)}")
    except (ValueError, FileNotFoundError, DownloadError) as e:
        fail(str(e))
