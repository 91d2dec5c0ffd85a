"""
How each dataset's raw file is read into records: {instruction, input, output} dicts for instruction data,
{text, label} dicts for classification. Every file is hostile until read: records that don't fit are skipped
and counted (Skips), zip members are read without extraction, and XML may declare no DTD.

    skips, counts = Skips(), Counter()
    records = read_records("mine", Path("mine.jsonl"), skips, counts)
"""

import csv
import io
import json
import sys
import zipfile
import xml.etree.ElementTree as ET
from collections import Counter
from itertools import chain
from pathlib import Path, PurePosixPath

MAX_MEMBER_BYTES = 1 << 26  # a zip member larger than this (64 MB) is refused: no real dataset file is near it
MAX_RATIO = 100  # a zip member compressed more than 100:1 is refused: text compresses 3-10:1, bombs far more
MAX_FILE_BYTES = 1 << 30  # a .json/.csv/.tsv read whole must be under 1 GB (a .jsonl is streamed)
MAX_RECORDS = 1_000_000  # more records than this are refused: memory grows with their number


class Skips(Counter):
    """Records left out, counted by reason; the first few of each are printed so a bad file is easy to fix."""
    shown = 3

    def add(self, reason, example):
        self[reason] += 1
        if self[reason] <= self.shown:
            print(f"  skipped ({reason}): {str(example)[:160]!r}")


def decode(data, where):
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, if any, is not part of the data
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e}): convert it to UTF-8 and try again") from None
    if not text.strip():
        raise ValueError(f"{where} is empty: if it was downloaded, delete it and run again")
    return text


def read_text(path):
    """A whole file as text: for the formats that cannot be read a piece at a time (a JSON list)."""
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} a dataset file read whole "
                         f"may have: write it as .jsonl (one record a line), which is read a line at a time")
    return decode(Path(path).read_bytes(), path)


MAX_LINE = 1 << 26  # a line longer than 64 M characters is no record: it is skipped, never held whole


def lines_of(stream, where):
    """The lines of a binary stream, decoded as UTF-8, split at '\n' only (not splitlines(): an SMS may hold
    \x0c or \u2028), without their line ends; read a piece at a time. A line over MAX_LINE is skipped (with a
    note) as it is read, so memory stays bounded."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="\n")
    try:
        while line := text.readline(MAX_LINE):
            if len(line) == MAX_LINE and not line.endswith("\n"):
                while (rest := text.readline(MAX_LINE)) and not rest.endswith("\n"):
                    pass  # the rest of the line, a piece at a time
                print(f"  skipped a line of {where} longer than {MAX_LINE:,} characters", file=sys.stderr)
                continue
            yield line.removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e}): convert it to UTF-8 and try again") from None
    except zipfile.BadZipFile as e:  # a zip member that fails its CRC as it is read
        raise ValueError(f"{where} is damaged ({e}): if it was downloaded, delete it and run again") from None


def file_lines(path):
    with open(path, "rb") as f:
        yield from lines_of(f, path)


def zip_members(path, skips, keep):
    """(name, binary stream) of the zip's files for which keep(name) holds, read as streams and never extracted.
    Names that would escape an extraction folder are refused anyway, and so is anything bomb-sized."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir() or not keep(info.filename):
                    continue
                if unsafe_name(info.filename):
                    skips.add("unsafe member name", info.filename)
                elif info.file_size > MAX_MEMBER_BYTES:  # zipfile never inflates past the declared size
                    skips.add(f"member larger than {MAX_MEMBER_BYTES:,} bytes", info.filename)
                elif info.file_size > MAX_RATIO * max(info.compress_size, 1):
                    skips.add(f"member compressed more than {MAX_RATIO}:1 (a zip bomb?)", info.filename)
                else:
                    try:
                        member = z.open(info)
                    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as e:  # encrypted...
                        skips.add(f"unreadable member ({e.__class__.__name__})", f"{info.filename}: {e}")
                        continue
                    with member:
                        yield info.filename, member
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable zip file ({e}): if it was downloaded, delete it and "
                         f"run again") from None


def unsafe_name(name):
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or (len(parts) > 0 and ":" in parts[0])


def counted(items, counts, where):
    """items, counted into counts['read'] as they are read; past MAX_RECORDS, a ValueError."""
    for item in items:
        counts["read"] += 1
        if counts["read"] > MAX_RECORDS:
            raise ValueError(f"{where} has more than {MAX_RECORDS:,} records: split it into several datasets")
        yield item


# ----------------------------------------------------------------------------- records

def read_records(name, raw, skips, counts, suffix=None):
    """The dataset's records, {instruction, input, output} or {text, label} dicts; bad ones are skipped. The
    format goes by the file's suffix (or the one given, for a download not yet renamed)."""
    suffix = (suffix or raw.suffix).lower()
    if name == "medquad" and suffix == ".csv":  # Kaggle's medquad.csv: question, answer, source, focus_area
        return medquad_records(columns(csv_rows(raw), ("question", "answer"), raw, skips, counts), skips, counts)
    if name == "medquad":
        return medquad_records(medquad_zip_pairs(raw, skips, counts), skips, counts)
    if name == "spam":
        return read_sms(raw, skips, counts)
    if suffix in (".json", ".jsonl"):
        return read_instructions(raw, skips, counts, lines=suffix == ".jsonl")
    rows = csv_rows(raw) if suffix == ".csv" else tsv_rows(file_lines(raw))
    return labelled(rows, raw, skips, counts)


def read_instructions(path, skips, counts, lines=False):
    """Alpaca records from a .json list, or with lines=True a .jsonl file (one object a line)."""
    items = jsonl_items(file_lines(path), skips) if lines else json_items(read_text(path), path)
    records = []
    for item in counted(items, counts, path):
        reason = invalid(item)
        if reason:
            skips.add(reason, item)
        else:
            records.append({"instruction": item["instruction"], "input": item.get("input", ""),
                            "output": item["output"]})
    counts["read"] += skips["not JSON"]  # lines read that held no JSON at all
    return records


def json_items(text, path):
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, and numbers of over 4,300 digits
        raise ValueError(f"{path} is not valid JSON ({e.__class__.__name__}: {str(e)[:100]}): an instruction "
                         f"dataset is a JSON list of {{instruction, input, output}} records, or a .jsonl file of "
                         f"one a line") from None
    if not isinstance(items, list):
        raise ValueError(f"{path} holds a JSON {type(items).__name__}, not a list of records")
    return items


def jsonl_items(lines, skips):
    """The JSON value of each non-blank line; a line that is not JSON is skipped."""
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except (ValueError, RecursionError) as e:
                skips.add("not JSON", f"line {n}: {e.__class__.__name__}: {line}")


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
    """The rows of a CSV file, read a row at a time (the csv module: quoted fields may hold commas and newlines)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield from csv.reader(f)
    except csv.Error as e:
        raise ValueError(f"{path} is not a readable CSV file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8 and try again") from None


def tsv_rows(lines, ncols=None):
    """Tab-separated rows, split by hand: a CSV reader would let a quote at the start of an SMS swallow the
    lines after it. Extra tabs stay in the last column (the text)."""
    for line in lines:
        if line.strip():
            ncols = ncols or len(line.split("\t"))
            yield line.split("\t", ncols - 1)


def columns(rows, names, where, skips, counts):
    """The named columns of each row under the header (the first row; names matched case-insensitively); the
    rows below the header are counted as read."""
    rows = iter(rows)
    first = next(rows, None)
    header = [h.strip().lower() for h in first or []]
    if not set(names) <= set(header):
        raise ValueError(f"{where} needs a header row naming the columns {' and '.join(names)}; its first row "
                         f"is {first}")
    for n, row in enumerate(counted(rows, counts, where), 2):
        if len(row) != len(header):
            skips.add(f"not {len(header)} columns", f"row {n}: {row}")
        else:
            yield [row[header.index(name)] for name in names]


def labelled(rows, where, skips, counts):
    """{text, label} records of a table with a label and a text column."""
    records = []
    for label, text in columns(rows, ("label", "text"), where, skips, counts):
        if label.strip() and text.strip():
            records.append({"text": text, "label": label.strip()})
        else:
            skips.add("empty label or text", [label, text])
    return records


def read_sms(path, skips, counts):
    """The SMS Spam Collection: 'ham<TAB>text' or 'spam<TAB>text' lines, from the UCI zip or the bare file."""
    rows = [["label", "text"]]
    if zipfile.is_zipfile(path):
        for name, member in zip_members(path, skips, lambda n: n.endswith("SMSSpamCollection")):
            return labelled(chain(rows, tsv_rows(lines_of(member, f"{path}:{name}"), ncols=2)), path, skips, counts)
        raise ValueError(f"{path} has no usable SMSSpamCollection file: is it the UCI SMS Spam Collection zip?")
    return labelled(chain(rows, tsv_rows(file_lines(path), ncols=2)), path, skips, counts)


def medquad_zip_pairs(path, skips, counts):
    """(question, answer) of every <QAPair> in the XML files of MedQuAD's GitHub archive."""
    pairs, files = [], 0
    for name, member in zip_members(path, skips, lambda n: n.endswith(".xml")):
        try:
            data = member.read()
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # its CRC, or a broken stream
            skips.add(f"unreadable member ({e.__class__.__name__})", f"{name}: {e}")
            continue
        root = parse_xml(data, name, skips)
        if root is not None:
            files += 1
            pairs += [(qa.findtext("Question") or "", qa.findtext("Answer") or "") for qa in root.iter("QAPair")]
            if len(pairs) > MAX_RECORDS:
                raise ValueError(f"{path} has more than {MAX_RECORDS:,} question-answer pairs: not MedQuAD")
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
    pairs = list(pairs)
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
