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
import zipfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path, PurePosixPath

MAX_MEMBER_BYTES = 1 << 28  # a zip member larger than this (256 MB) is refused: no real dataset file is near it


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


# ----------------------------------------------------------------------------- records

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
