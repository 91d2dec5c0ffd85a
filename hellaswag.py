"""
HellaSwag (Zellers et al. 2019): pick the right one of 4 endings of a sentence, by which ending the model finds
most likely after the context. GPT-2 124M gets ~29-31% (chance: 25%); humans 95%.

    examples = load_hellaswag(VAL_URL, cache_dir, "harness")    # downloaded once into cache_dir, checked
    for result in score(model, examples, style="harness"):      # one dict per example, the 4 endings batched
        print(result["pred"], result["pred_norm"], result["label"])

Two ways to score, as the two places people take their reference numbers from:
- harness: lm-evaluation-harness's hellaswag task. The context is activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize() and every text goes through its preprocess() (WikiHow's [title] and [step] markers out);
  each ending is scored as " " + ending, tokenized as the harness does (context + continuation encoded whole,
  then split after the context's tokens). acc: the highest summed log-probability; acc_norm: the highest
  summed log-probability per character of the ending (the harness divides by len(choice), a str's length).
- completion: llm.c / build-nanogpt's hellaswag.py. The raw ctx, " " + ending encoded on its own; acc: the
  lowest summed loss, acc_norm: the lowest mean loss per token of the ending.
"""

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import torch

from data import EOT, IGNORE, tokenizer
from download import download
from generation import target_logprobs

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"  # 10,042 examples
STYLES = ("harness", "completion")
HARNESS_FIELDS = ("activity_label", "ctx_a", "ctx_b")

# ----------------------------------------------------------------------------- the data


def load_hellaswag(source, cache_dir=None, style="completion"):
    """The examples of a HellaSwag .jsonl file: a URL (downloaded once into cache_dir, which must then be
    given) or a local path. A file that is not HellaSwag data (or lacks what style needs) is a ValueError
    naming the line, and a downloaded one is deleted, so the next run fetches it afresh."""
    if not str(source).startswith(("http://", "https://")):
        return read_examples(Path(source), style)
    name = Path(urlparse(source).path).name or "hellaswag.jsonl"
    key = hashlib.sha256(source.encode()).hexdigest()[:12]  # cached by URL: another source, another file
    path = download(source, Path(cache_dir) / "hellaswag" / f"{key}-{name}", desc=name)
    try:
        return read_examples(path, style)
    except ValueError:
        path.unlink()
        raise


def read_examples(path, style="completion"):
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                examples.append(check_example(line, f"{path} line {n}", style))
    if not examples:
        raise ValueError(f"{path} holds no HellaSwag example")
    return examples


def check_example(line, where, style="completion"):
    """One line as an example dict, with label an int; a ValueError saying what is wrong otherwise. The
    completion style reads ctx, endings and label; the harness style activity_label, ctx_a and ctx_b too."""
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}): not a HellaSwag .jsonl file") from None
    if not isinstance(ex, dict):
        raise ValueError(f"{where} is not a JSON object: not a HellaSwag .jsonl file")
    endings, label = ex.get("endings"), ex.get("label")
    if not isinstance(ex.get("ctx"), str):
        raise ValueError(f"{where} has no 'ctx' string: not a HellaSwag .jsonl file")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) and e for e in endings)):
        raise ValueError(f"{where} has no 'endings' list of 4 strings: not a HellaSwag .jsonl file")
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy stores it as text
        label = int(label)
    if not (type(label) is int and 0 <= label < 4):
        raise ValueError(f"{where} has label {ex.get('label')!r}, not 0-3 (the test split has no labels: use "
                         f"the validation file)")
    if style == "harness" and not all(isinstance(ex.get(k), str) for k in HARNESS_FIELDS):
        raise ValueError(f"{where} has no activity_label/ctx_a/ctx_b strings, which the harness style needs: "
                         f"use hellaswag_style=completion")
    return {**ex, "label": label}


# ----------------------------------------------------------------------------- what is scored


def preprocess(text):
    """lm-evaluation-harness's hellaswag preprocess: WikiHow's bracketed markers out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_request(ex):
    """(context, endings) as the harness's hellaswag task builds them."""
    context = preprocess(ex["activity_label"] + ": " + ex["ctx_a"] + " " + ex["ctx_b"].capitalize())
    return context, [preprocess(e) for e in ex["endings"]]


def encode_harness(ex, enc):
    """(context ids, [ending ids], [character lengths]): context + " " + ending encoded whole, split after the
    context's own ids; trailing spaces of the context move to the continuation, as in the harness."""
    context, endings = harness_request(ex)
    stripped = context.rstrip()
    spaces = context[len(stripped):]
    ctx_ids = enc.encode_ordinary(stripped)
    ends = [enc.encode_ordinary(stripped + spaces + " " + e)[len(ctx_ids):] for e in endings]
    return ctx_ids, ends, [max(1, len(e)) for e in endings]


def encode_completion(ex, enc):
    """(context ids, [ending ids], [token counts]) as build-nanogpt's render_example."""
    ends = [enc.encode_ordinary(" " + e) for e in ex["endings"]]
    return enc.encode_ordinary(ex["ctx"]), ends, [max(1, len(e)) for e in ends]


def rows_of(ctx_ids, ends, block_size):
    """(inputs, targets) id lists for context + each ending, the ending's tokens the only targets. An empty
    context becomes <|endoftext|> (as the harness does); too long a row keeps its last block_size + 1 tokens."""
    ctx_ids = ctx_ids or [EOT]
    rows = []
    for end in ends:
        tokens = (ctx_ids + end)[-(block_size + 1):]
        n = min(len(end), len(tokens) - 1)
        rows.append((tokens[:-1], [IGNORE] * (len(tokens) - 1 - n) + tokens[-n:]))
    return rows


def padded(rows, device):
    width = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [EOT] * (width - len(x)) for x, _ in rows], device=device)
    y = torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in rows], device=device)
    return x, y


# ----------------------------------------------------------------------------- scoring


def score(model, examples, style="harness", batch_size=8, ctx=None):
    """Yield one result per example: the 4 endings' summed log-probabilities, token counts, what acc_norm
    divides by, the label and both predictions. batch_size examples (4 rows each) run as one batch."""
    if style not in STYLES:
        raise ValueError(f"hellaswag style '{style}' must be one of {', '.join(STYLES)}")
    enc, device = tokenizer(), model.wte.weight.device
    encode = encode_harness if style == "harness" else encode_completion
    for start in range(0, len(examples), batch_size):
        group = examples[start:start + batch_size]
        encoded = [encode(ex, enc) for ex in group]
        rows = [row for ctx_ids, ends, _ in encoded for row in rows_of(ctx_ids, ends, model.config.block_size)]
        sums, counts = target_logprobs(model, *padded(rows, device), ctx)
        for i, (ex, (_, _, norms)) in enumerate(zip(group, encoded)):
            logprobs, tokens = sums[4 * i:4 * i + 4], counts[4 * i:4 * i + 4]
            per_unit = [lp / n for lp, n in zip(logprobs, norms)]
            yield {"ind": ex.get("ind", start + i), "label": ex["label"], "logprobs": logprobs, "tokens": tokens,
                   "norm_by": norms, "pred": argmax(logprobs), "pred_norm": argmax(per_unit)}


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equals, like numpy


def accuracy(results):
    """{'acc', 'acc_norm', 'n'} of score()'s results."""
    n = len(results)
    return {"acc": sum(r["pred"] == r["label"] for r in results) / n,
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in results) / n, "n": n}
