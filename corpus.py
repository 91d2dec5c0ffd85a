"""
Plain text at any scale, tokenized into uint16 shards in bounded memory, for language-model fine-tuning: a .txt
file, a folder of .txt/.jsonl files, or .jsonl/.json records with a "text" field (FineWeb's shape). Each
document starts with <|endoftext|>; the val split is carved off first (as llm.c and build-nanogpt do), about
val_fraction of the text; tokenizing runs on all cores; an interrupted run resumes after the last shard it wrote.

    shards = tokenize_corpus(documents(["book.txt"]), total_bytes, Path("data/book/.prepare-text"))

Memory stays bounded by one shard (shard_tokens x 2 bytes) and a few pieces of text in flight, whatever the
size of the corpus.
"""

import codecs
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data import EOT, encode_batch
from download import sha256_of
from readers import MAX_FILE_BYTES, lines_of
from weights import atomic_write

PIECE_CHARS = 1 << 20  # text is tokenized in pieces of about 1 M characters
# a cut where GPT-2's pre-tokenizer splits anyway, so the pieces' ids are exactly the whole text's: between a
# non-space character and a single space or newline that is followed by a non-space character
CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def text_files(source):
    """The files of a text source: the file itself, or a folder's .txt/.jsonl/.json files, sorted by name."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"folder {source} holds no .txt, .jsonl or .json file")
        return files
    return [source]


def is_text_records(path):
    """Whether a .json/.jsonl file holds text records ({"text": ...}) rather than Alpaca records: by the keys of
    its first record."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n[")
    match = re.match(r"\{.*?\}", head, re.S)
    first = match.group(0) if match else head
    return '"text"' in first and '"instruction"' not in first


def documents(files, skips):
    """Each document's text, a piece at a time: (piece, starts_document). A .txt file is one document, read in
    blocks; each record of a .jsonl/.json file is one ({"text": ...}; records without text are counted in skips)."""
    for path in files:
        texts = [txt_blocks(path)] if path.suffix.lower() == ".txt" else ([text] for text in record_texts(path, skips))
        for blocks in texts:
            for i, piece in enumerate(pieces(blocks)):
                yield piece, i == 0


def txt_blocks(path, size=PIECE_CHARS):
    """A UTF-8 text file's text, a block at a time (exactly its characters: no newline is changed)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    with open(path, "rb") as f:
        while True:
            block = f.read(size)
            try:  # the last call (an empty block) is final: a character cut off at the end is an error too
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason} near byte {f.tell() - len(block) + e.start}): "
                                 f"convert it to UTF-8 and try again") from None
            if text:
                yield text
            if not block:
                return


def pieces(blocks):
    """The text of blocks (strings) cut at CUT points into pieces of about PIECE_CHARS; a stretch with no cut
    point grows until it has one."""
    carry = ""
    for block in blocks:
        carry += block
        start = 0
        while len(carry) - start > PIECE_CHARS:
            cut = CUT.search(carry, start + PIECE_CHARS)
            if cut is None:
                break
            yield carry[start:cut.start()]
            start = cut.start()
        carry = carry[start:]
    if carry:
        yield carry


def split_at(pieces_in, val_bytes):
    """(piece, starts_document, split, bytes) for each piece: 'val' until val_bytes bytes of text have gone by,
    then 'train'. Counted in UTF-8 bytes, as the files' sizes are (in characters, a file of 3-byte characters
    would put three times val_fraction into val). The piece that crosses the mark is cut at the first CUT point
    after it."""
    seen = 0
    for text, first in pieces_in:
        size = len(text.encode("utf-8", "surrogatepass"))  # JSON strings may hold lone surrogates
        cut = None
        if seen < val_bytes < seen + size:
            cut = CUT.search(text, int((val_bytes - seen) * len(text) / size))
        if cut:
            head = text[:cut.start()]
            head_size = len(head.encode("utf-8", "surrogatepass"))
            yield head, first, "val", head_size
            yield text[cut.start():], False, "train", size - head_size
        else:
            yield text, first, "val" if seen < val_bytes else "train", size
        seen += size


def record_texts(path, skips, lines=None):
    """The "text" of each record of a .jsonl file (lines=True: a line at a time) or a .json list (read whole, so
    under MAX_FILE_BYTES); by default the suffix tells which."""
    if not (path.suffix.lower() == ".jsonl" if lines is None else lines):
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path} is over {MAX_FILE_BYTES:,} bytes: write it as .jsonl, one record a line")
        try:
            records = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError(f"{path} is not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path} holds a JSON {type(records).__name__}, not a list of {{\"text\": ...}} records")
    else:
        records = (json_or_none(line) for line in open_lines(path))
    for record in records:
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            yield text
        else:
            skips["no text"] = skips.get("no text", 0) + 1


def open_lines(path):
    with open(path, "rb") as f:
        yield from (line for line in lines_of(f, path) if line.strip())


def json_or_none(line):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


# ----------------------------------------------------------------------------- shards

class Shards:
    """Writes tokens into uint16 .npy shards of shard_tokens each, per split, in folder; each shard is written to
    a temp name and renamed, and recorded in progress.json with where the input stood, so that an interrupted run
    goes on after it."""

    def __init__(self, folder, shard_tokens, settings):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.buffer = np.empty(shard_tokens, np.uint16)
        self.filled = 0
        self.progress = self.read_progress(settings)
        self.split = self.progress["shards"][-1]["split"] if self.progress["shards"] else "val"

    def read_progress(self, settings):
        """What an interrupted run with the same settings left; anything else is started over."""
        path = self.folder / "progress.json"
        fresh = {"settings": settings, "shards": [], "piece": 0, "offset": 0}
        try:
            progress = json.loads(path.read_text()) if path.exists() else fresh
        except (ValueError, OSError):
            progress = fresh
        whole = all((self.folder / s["file"]).exists() for s in progress.get("shards", []))
        return progress if progress.get("settings") == settings and whole else fresh

    def add(self, tokens, piece, split, start=0):
        """Append tokens[start:] (the ids of input piece number `piece`, in `split`), writing each shard as it
        fills."""
        if split != self.split:
            self.flush(piece, 0)
            self.split = split
        while start < len(tokens):
            n = min(len(tokens) - start, self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[start:start + n]
            self.filled, start = self.filled + n, start + n
            if self.filled == self.shard_tokens:
                self.flush(piece, start)

    def flush(self, piece, offset):
        """Write the tokens so far as a shard; the input goes on at token `offset` of piece number `piece`."""
        if not self.filled:
            return
        index = sum(s["split"] == self.split for s in self.progress["shards"])
        name = f"{self.split}_{index:06d}.npy"
        tmp = self.folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.buffer[:self.filled])
        digest = sha256_of(tmp)  # in pieces: the shard is not read back whole
        os.replace(tmp, self.folder / name)
        self.progress["shards"].append({"split": self.split, "file": name, "tokens": self.filled, "sha256": digest})
        self.progress.update(piece=piece, offset=offset)
        atomic_write(self.folder / "progress.json", [json.dumps(self.progress).encode()])
        self.filled = 0


def tokenize_corpus(pieces_in, total_bytes, folder, shard_tokens=100_000_000, val_fraction=0.1, source_id="",
                    batch=None, log=print):
    """Tokenize (piece, starts_document) pairs into shards in folder: about the first val_fraction of total_bytes
    (the sources' size) go to val, the rest to train. Goes on after the shards an interrupted call with the same
    settings and source_id (say, the sources' sizes and times) left in folder. Returns the shards (split, file,
    tokens, sha256) and the documents and bytes of text read."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = Shards(folder, shard_tokens, {"shard_tokens": shard_tokens, "val_fraction": val_fraction,
                                           "source": source_id})
    resume_piece, resume_offset = shards.progress["piece"], shards.progress["offset"]
    if resume_piece:
        log(f"  resuming after the {len(shards.progress['shards'])} shards already written")
    seen, done_bytes, start, number = 0, 0, time.time(), -1
    batch = batch or 8 * PIECE_CHARS  # characters tokenized together: many small records make one call
    group, grouped, shown, pending = [], 0, 0.0, None

    def store(tokenized):
        """Put a tokenized group's ids into the shards, in input order."""
        nonlocal done_bytes
        pieces_done, ids_list = tokenized
        for (number, text, first, split, size), ids in zip(pieces_done, ids_list):
            tokens = np.concatenate([[EOT], ids]) if first else ids
            # the start of the piece an interrupted run stopped in is in the last shard it wrote
            shards.add(tokens, number, split, resume_offset if number == resume_piece else 0)
            done_bytes += size

    documents = 0
    with ThreadPoolExecutor(1) as background:  # a group is tokenized while the next one is read
        for number, (text, first, split, size) in enumerate(split_at(pieces_in, val_fraction * total_bytes)):
            seen, documents = seen + size, documents + first
            if number < resume_piece:
                continue  # already in a shard: read past it, do not tokenize it again
            group.append((number, text, first, split, size))
            grouped += len(text)
            if grouped >= batch:
                if pending:
                    store(pending.result())
                pending = background.submit(lambda g: (g, encode_batch([p[1] for p in g])), group)
                group, grouped = [], 0
            if time.time() - shown > 2:
                shown = progress(seen, total_bytes, done_bytes, start, log)
        if pending:
            store(pending.result())
    store((group, encode_batch([p[1] for p in group])))
    shards.flush(number + 1, 0)
    progress(seen, seen, done_bytes, start, log)
    return {**shards.progress, "documents": documents, "bytes": seen}


def progress(seen, total, done, start, log):
    seconds = time.time() - start
    rate = done / max(seconds, 1e-9)
    eta = (total - seen) / rate if rate else 0
    log(f"  tokenized {amount(seen)} of {amount(total)} ({100 * seen / max(total, 1):.0f}%), {amount(rate)}/s, "
        f"ETA {eta:.0f}s")
    return time.time()


def amount(n):
    """42,560 bytes or 1,024.3 MB: small files read as counts, large ones in megabytes."""
    return f"{n:,.0f} bytes" if n < 1e6 else f"{n / 1e6:,.1f} MB"
