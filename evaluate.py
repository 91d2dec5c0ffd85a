"""
Did the fine-tuning work? Scores a model, and its starting point side by side, in numbers:
- the test split of its instruction dataset: the loss (and perplexity) of the reference answers, counting the
  response tokens only; the model's greedy answers, scored by ROUGE-L, token F1 and exact match;
- an LLM judge's 0-100 score of each answer (the prompt of "Build a LLM from scratch" ch07), or which of the
  model's and the baseline's answers is better (pairwise, in random order);
- HellaSwag accuracy, as lm-evaluation-harness or as llm.c / build-nanogpt score it.

    python evaluate.py --model=out/instruction-data/ckpt.pt --baseline=gpt2
    python evaluate.py --model=out/instruction-data/ckpt.pt --judge=ollama:llama3.1 --judge_mode=both --baseline=gpt2
    python evaluate.py --model=gpt2 --answers=False --hellaswag=True --limit=1000 --out_dir=eval/gpt2

It writes out_dir/report.json (every number and every setting), report.md (a table, and the five answers the
judge scored most differently), answers.jsonl and hellaswag.jsonl (per example) and, with matplotlib, report.png.
"""

import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import hellaswag as hs
from configurator import checked, configure, fail
from data import Split, collate, load_records, tokenizer
from download import DownloadError, sha256_of
from generation import (Progress, answer, answer_rows, clock, cpu_name, pick_device, target_logprobs,
                        weights_dtype)
from judge import Cache, Judge, JudgeError, compare_answers, score_answers
from load_gpt2 import cache_dir, load_model
from metrics import answer_metrics, bootstrap_ci, mean_ci
from prepare import prepare
from quantize import choose_decode_kernel, kernel_line
from weights import atomic_write

# -----------------------------------------------------------------------------
model = "gpt2"  # what to evaluate: finetune.py's ckpt.pt, a GPT-2 name, a Hugging Face folder or a .safetensors file
baseline = ""  # evaluated the same way, side by side: usually the starting point (gpt2, gpt2-medium); empty: none
dataset = ""  # the instruction dataset whose test split is scored; empty: the one the checkpoint was trained on
data_dir = "data"  # where prepare.py keeps datasets
out_dir = "eval"  # the report goes here
overwrite = False  # replace an earlier report in out_dir
limit = 0  # evaluate only the first N examples of the test split and of HellaSwag; 0 = all
answers = True  # the test split: loss and perplexity of the references, greedy answers, ROUGE-L / F1 / exact match
max_new_tokens = 256  # the most tokens of a generated answer (finetune.py's test_responses.json: 256 too)
batch_size = 8  # examples per batch of the loss and HellaSwag (4 rows per example); answers: as many as memory allows
judge = ""  # ollama:MODEL (Ollama's /api/chat at OLLAMA_HOST) or openai:MODEL (at judge_url); empty: no judge
judge_url = ""  # the judge's base URL; openai: needed (https://api.openai.com...); ollama: default OLLAMA_HOST
judge_key_env = "OPENAI_API_KEY"  # the environment variable with the judge's API key (sent only if it is set)
judge_mode = "score"  # score (0-100 per answer), pairwise (the model's or the baseline's answer?) or both
judge_concurrency = 4  # requests to the judge in flight at once
judge_timeout = 120.0  # seconds to wait for the judge's reply
judge_retries = 4  # attempts per request on a dropped connection, a timeout, 429 or 5xx (the wait doubles)
judge_max_tokens = 16  # the longest reply asked of the judge (an integer is 1-3 tokens)
judge_cache = ""  # append-only file of the judge's replies; empty: <NANOFT_CACHE or ~/.cache/nanoft>/judge.jsonl
hellaswag = False  # HellaSwag validation accuracy (its 10,042-example file is downloaded once)
hellaswag_style = "harness"  # harness (lm-evaluation-harness's numbers) or completion (llm.c / build-nanogpt's)
hellaswag_url = hs.VAL_URL  # the HellaSwag .jsonl: a URL (downloaded once, checked) or a local file
bootstrap = 1000  # resamples for the bootstrap 95% confidence intervals
seed = 1337  # the bootstrap's resamples and the pairwise judge's order of the two answers
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # the weights: auto (float32 on the CPU, bf16 or fp16 on a GPU), float32, bfloat16 or float16
# -----------------------------------------------------------------------------


def check_settings(c):
    """Impossible values, found before anything is loaded; returns the list of problems."""
    problems = [f"{k}={c[k]} must be at least 1" for k in ("max_new_tokens", "batch_size", "judge_concurrency",
                                                          "judge_retries", "judge_max_tokens") if c[k] < 1]
    problems += [f"limit={c['limit']} must be 0 (all) or more"] if c["limit"] < 0 else []
    problems += [f"judge_timeout={c['judge_timeout']} must be positive"] if not c["judge_timeout"] > 0 else []
    problems += [f"bootstrap={c['bootstrap']} must be at least 100"] if c["bootstrap"] < 100 else []
    for key, allowed in (("judge_mode", ("score", "pairwise", "both")), ("hellaswag_style", hs.STYLES),
                         ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if c[key] not in allowed:
            problems.append(f"{key}='{c[key]}' must be one of {', '.join(allowed)}")
    if c["judge"]:
        kind, _, name = c["judge"].partition(":")
        if kind not in ("ollama", "openai") or not name:
            problems.append(f"judge='{c['judge']}' must be ollama:MODEL (e.g. ollama:llama3.1) or openai:MODEL")
        if kind == "openai" and not c["judge_url"]:
            problems.append("judge=openai:... needs judge_url, the server's base URL (e.g. https://api.openai.com)")
        if not c["answers"]:
            problems.append("the judge scores the test split's answers: it needs answers=True")
        if c["judge_mode"] != "score" and not c["baseline"]:
            problems.append(f"judge_mode={c['judge_mode']} compares the model with the baseline: give --baseline")
    if not (c["answers"] or c["hellaswag"]):
        problems.append("answers=False and hellaswag=False: nothing to evaluate")
    return problems


# ----------------------------------------------------------------------------- the models and the data

def load(name, device, dtype):
    """(gpt, info) of a model to evaluate; a one-line error for anything that is not a GPT-2 language model."""
    try:
        gpt, info = load_model(name, device, weights_dtype(dtype, device.split(":")[0]))
    except (ValueError, FileNotFoundError, DownloadError, OSError) as e:
        fail(f"could not load model '{name}': {e}")
    print(f"{name}: {gpt.num_params() / 1e6:.1f}M parameters, context {gpt.config.block_size}, on {device}")
    return gpt.eval(), info


def test_split(c, info):
    """(folder, records) of the test split to score: --dataset's, else the one the checkpoint was trained on."""
    trained = info.get("config") or {}
    name = c.dataset or trained.get("dataset")
    if not name:
        fail(f"{c.model} does not say what it was trained on (it is not finetune.py's ckpt.pt): give "
             f"--dataset=instruction-data (or any instruction dataset), or answers=False")
    same = not c.dataset or c.dataset == trained.get("dataset")
    try:  # the checkpoint's seed and max_length: the same split it held out
        folder = prepare(name, c.data_dir, **({k: trained[k] for k in ("seed", "max_length") if k in trained}
                                              if same else {}))
        meta = json.loads((folder / "meta.json").read_text())
    except (ValueError, OSError, DownloadError) as e:
        fail(f"dataset '{name}': {e}")
    if meta["kind"] != "instruction":
        fail(f"dataset '{name}' has no reference answers ({meta['kind']} data): evaluate.py scores answers "
             f"against an instruction dataset's outputs; give --dataset=instruction-data or an Alpaca-format "
             f".json, or answers=False")
    if not meta["splits"].get("test"):
        fail(f"dataset '{name}' has an empty test split: there are no reference answers to score against")
    trained_meta = info.get("meta") or {}
    if trained_meta.get("sha256") and trained_meta["sha256"] != meta["sha256"]:
        print(f"warning: {folder} is not the file {c.model} was trained on (sha256 differs): its test split may "
              f"hold training examples", file=sys.stderr)
    return folder, load_records(folder, "test")


def response_losses(model, split, indices, batch_size, what="test loss"):
    """Per example: (summed negative log-likelihood of the reference response and its <|endoftext|>, tokens).
    Examples are batched shortest first; one longer than the context keeps its first block_size + 1 tokens."""
    order, cut = sorted(indices, key=lambda i: split.lengths[i]), model.config.block_size + 1
    progress = Progress(what, split.tokens(indices, cut), "tokens", quiet=0)
    nll, tokens = {}, {}
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        examples = [(ids[:cut], n) for ids, n in map(split.example, group)]
        x, y = collate(examples, mask_prompt=True, device=model.wte.weight.device)
        sums, counts = target_logprobs(model, x, y)
        for i, s, n in zip(group, sums, counts):
            nll[i], tokens[i] = -s, n
        progress.update(split.tokens(group, cut))
    return [nll[i] for i in indices], [tokens[i] for i in indices]


def generate_answers(model, split, indices, max_new_tokens, progress):
    """Greedy answers (text) to the examples' prompts (generation.answer: rows decoded together, continuously
    refilled), in float32 on the CPU with the decode kernel measured fastest here for that many rows."""
    enc, prompts = tokenizer(), [split.prompt(i) for i in indices]
    rows = answer_rows(model, prompts, max_new_tokens)
    kernel, timings = choose_decode_kernel(model, rows)
    if timings:
        print(kernel_line(kernel, timings, rows), file=sys.stderr)
    answers = answer(model, prompts, max_new_tokens, batch_size=rows, progress=progress)
    return [enc.decode(a).strip() for a in answers]


def saved_answers(name, records, max_new_tokens):
    """finetune.py's answers in test_responses.json beside a checkpoint, if test_responses.meta.json says they
    are this very file's (its sha256), to these records, with this max_new_tokens; else None, saying why."""
    path = Path(name)
    saved, info_path = path.with_name("test_responses.json"), path.with_name("test_responses.meta.json")
    if not (path.is_file() and saved.exists()):
        return None
    try:
        info, responses = json.loads(info_path.read_text()), json.loads(saved.read_text())
        why = why_not_reused(path, info, responses, records, max_new_tokens)
    except FileNotFoundError:
        why = f"there is no {info_path.name} beside it to say which checkpoint wrote it"
    except (OSError, ValueError, AttributeError, TypeError) as e:
        why = f"it cannot be read ({e.__class__.__name__}: {e})"
    if why:
        print(f"not reusing {saved}: {why}; generating the answers", file=sys.stderr)
        return None
    print(f"reusing the answers in {saved} (iteration {info.get('iter_num')}, sha256 {info['sha256'][:12]}...)")
    return [r["model_response"] for r in responses[:len(records)]]


def why_not_reused(path, info, responses, records, max_new_tokens):
    if info.get("max_new_tokens") != max_new_tokens:
        return f"it has max_new_tokens={info.get('max_new_tokens')} (not {max_new_tokens})"
    if len(responses) < len(records) or any(r.get(k) != rec[k] for r, rec in zip(responses, records)
                                            for k in ("instruction", "input", "output")):
        return "its records are not this test split's"
    if not all(isinstance(r.get("model_response"), str) for r in responses[:len(records)]):
        return "its model_response entries are not all text"
    print(f"checking that {path} wrote it (sha256 of {path.stat().st_size / 1e6:,.0f} MB)", file=sys.stderr)
    if sha256_of(path) != info.get("sha256"):  # best.pt is the same file as ckpt.pt when the last was the best
        return f"its answers are {info.get('checkpoint')}'s at iteration {info.get('iter_num')}, not this file's"
    return None


def evaluate_answers(gpt, name, c, folder, records):
    """The test-split part for one model: {'summary', 'examples'} (each example's answer, loss and metrics)."""
    split, indices = Split(folder, "test"), list(range(len(records)))
    nll, tokens = response_losses(gpt, split, indices, c.batch_size, f"{name}: test loss")
    texts, source = saved_answers(name, records, c.max_new_tokens), "test_responses.json"
    if texts is None:
        progress = Progress(f"{name}: answering", len(indices), quiet=0)
        texts, source = generate_answers(gpt, split, indices, c.max_new_tokens, progress), "generated"
    examples = [{"answer": t, "loss": l / n if n else None, "tokens": n, **answer_metrics(t, r["output"])}
                for t, l, n, r in zip(texts, nll, tokens, records)]
    loss = sum(nll) / sum(tokens) if sum(tokens) else float("nan")  # per token: longer answers weigh more
    ci = bootstrap_ci(nll, tokens, c.bootstrap, c.seed)
    summary = {"n": len(records), "answers_from": source, "response_tokens": sum(tokens),
               "loss": {"mean": loss, "ci95": ci, "n": len(records)},
               "perplexity": {"mean": math.exp(loss), "ci95": [math.exp(v) for v in ci] if ci else None,
                              "n": len(records)},
               **{k: mean_ci([e[k] for e in examples], c.bootstrap, c.seed)
                  for k in ("rouge_l", "token_f1", "exact_match")}}
    return {"summary": summary, "examples": examples}


def hellaswag_examples(c):
    """The HellaSwag examples to score (the first limit of them), or a one-line error."""
    try:
        examples = hs.load_hellaswag(c.hellaswag_url, cache_dir(), c.hellaswag_style)
    except (ValueError, OSError, DownloadError) as e:
        fail(f"HellaSwag from {c.hellaswag_url}: {e}")
    return examples[:c.limit] if c.limit else examples


def evaluate_hellaswag(gpt, name, c, examples):
    progress, results = Progress(f"{name}: HellaSwag ({c.hellaswag_style})", len(examples), quiet=0), []
    for result in hs.score(gpt, examples, c.hellaswag_style, c.batch_size):
        results.append(result)
        progress.update()
    summary = {**hs.accuracy(results), "style": c.hellaswag_style}
    for key, pred in (("acc", "pred"), ("acc_norm", "pred_norm")):
        summary[f"{key}_ci95"] = bootstrap_ci([r[pred] == r["label"] for r in results], None, c.bootstrap, c.seed)
    return {"summary": summary, "examples": results}


def evaluate(name, c, data, swag, gpt_info=None):
    """Everything asked for, for one model: {'model', 'parameters', 'answers', 'hellaswag'}."""
    gpt, info = gpt_info or load(name, c.device, c.dtype)
    result = {"model": name, "parameters": gpt.num_params(), "answers": None, "hellaswag": None}
    if info.get("config"):
        result["trained_on"] = info["config"].get("dataset")
    if c.answers:
        result["answers"] = evaluate_answers(gpt, name, c, *data)
    if c.hellaswag:
        result["hellaswag"] = evaluate_hellaswag(gpt, name, c, swag)
    return result


# ----------------------------------------------------------------------------- the judge

def start_judge(c):
    """A Judge that is reachable and has the model (asked before any model is loaded), or a one-line error."""
    path = c.judge_cache or str(cache_dir() / "judge.jsonl")
    try:
        cache = Cache(path)
    except OSError as e:
        fail(f"cannot use {path} as the judge's cache ({e.strerror or e}): give judge_cache=a file you can write")
    if cache.unreadable:
        print(f"note: {cache.unreadable} unreadable line(s) in {cache.path} were skipped (an interrupted write)",
              file=sys.stderr)
    try:
        judge = Judge(c.judge, cache, c.judge_url or None, os.environ.get(c.judge_key_env) or None,
                      c.judge_timeout, c.judge_retries, c.judge_max_tokens)
        judge.check()
    except JudgeError as e:
        fail(str(e))
    return judge


def asking(judge, what, n, unit, ask):
    """ask(on_each) with progress; a judge that stops answering is a one-line error, Ctrl-C leaves at once."""
    progress = Progress(what, n, unit, quiet=0)
    try:
        return ask(progress.update)
    except JudgeError as e:  # os._exit: requests still in flight would hold a normal exit for minutes
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the verdicts so far are cached in {judge.cache.path}; run the same command again "
              f"to go on from there", file=sys.stderr, flush=True)
        os._exit(130)


def judge_scores(judge, records, result, c):
    """The judge's 0-100 score of each of a model's answers, into its examples and summary."""
    examples = result["answers"]["examples"]
    answers = [e["answer"] for e in examples]
    got = asking(judge, f"{result['model']}: judge {c.judge}", sum(map(bool, answers)), "answers",
                 lambda on_each: score_answers(judge, records, answers, c.judge_concurrency, on_each))
    for e, v in zip(examples, got):
        e.update(judge=v.value, judge_reply=v.text, reasked=v.reasked)
    scores = [v.value for v in got if v.value is not None]
    result["answers"]["summary"]["judge"] = {
        **mean_ci(scores, c.bootstrap, c.seed), "judge": c.judge, "unparsable": len(got) - len(scores),
        "reasked": sum(v.reasked for v in got), "empty_answers": answers.count("")}


def judge_pairs(judge, records, model_result, base_result, c):
    """Which is better, the model's answer or the baseline's: per example, and the model's win rate."""
    ours, theirs = ([e["answer"] for e in r["answers"]["examples"]] for r in (model_result, base_result))
    duels = asking(judge, f"model vs baseline: judge {c.judge}", len(records), "pairs", lambda on_each:
                   compare_answers(judge, records, ours, theirs, c.seed, c.judge_concurrency, on_each))
    names = {"ours": "model", "theirs": "baseline", None: None}
    examples = [{"A": "model" if d["ours_first"] else "baseline", "choice": d["verdict"].value,
                 "winner": names[d["winner"]], "reply": d["verdict"].text, "reasked": d["verdict"].reasked}
                for d in duels]
    decided = [e for e in examples if e["winner"]]
    wins = sum(e["winner"] == "model" for e in decided)
    return {"judge": c.judge, "model_win_rate": mean_ci([e["winner"] == "model" for e in decided], c.bootstrap,
                                                        c.seed),
            "model_wins": wins, "baseline_wins": len(decided) - wins, "unparsable": len(examples) - len(decided),
            "reasked": sum(e["reasked"] for e in examples),
            "first_shown_chosen": sum(e["choice"] == "A" for e in decided) / len(decided) if decided else None,
            "examples": examples}


# ----------------------------------------------------------------------------- the report

LABELS = {"loss": "loss (response tokens)", "perplexity": "perplexity", "rouge_l": "ROUGE-L F1",
          "token_f1": "token F1 (SQuAD)", "exact_match": "exact match (SQuAD)", "judge": "judge score (0-100)",
          "acc": "HellaSwag acc", "acc_norm": "HellaSwag acc_norm"}


def cell(stat, digits=3):
    """'0.412 [0.381, 0.445]' from {'mean', 'ci95'}, or an em dash."""
    if not stat or stat.get("mean") is None:
        return "—"
    ci = f" [{stat['ci95'][0]:.{digits}f}, {stat['ci95'][1]:.{digits}f}]" if stat.get("ci95") else ""
    return f"{stat['mean']:.{digits}f}{ci}"


def table_rows(result):
    """{metric: (stat, digits, note)} of one model's summary, in the table's order."""
    rows, a, h = {}, (result["answers"] or {}).get("summary"), (result["hellaswag"] or {}).get("summary")
    if a:
        rows.update({k: (a[k], 3, "") for k in ("loss", "perplexity", "rouge_l", "token_f1", "exact_match")})
        if "judge" in a:
            j = a["judge"]
            rows["judge"] = (j, 1, f"n={j['n']}" + (f", {j['unparsable']} unparsable" if j["unparsable"] else ""))
    if h:
        for key in ("acc", "acc_norm"):
            rows[key] = ({"mean": h[key], "ci95": h[f"{key}_ci95"]}, 4, f"n={h['n']}, {h['style']}")
    return rows


def markdown(c, results, pairwise, data):
    names = [r["model"] for r in results]
    lines = [f"# Evaluation of {c.model}", ""]
    if data:
        lines += [f"Test split of `{data[0]}`: {len(data[1])} examples; answers greedy, at most {c.max_new_tokens} "
                  f"tokens. 95% bootstrap confidence intervals in brackets.", ""]
    lines += ["| metric | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = [table_rows(r) for r in results]
    for key in LABELS:
        if key in rows[0]:
            cells = [cell(r[key][0], r[key][1]) + (f" ({r[key][2]})" if r[key][2] else "") if key in r else "—"
                     for r in rows]
            lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    if pairwise:
        p = pairwise
        lines += ["", f"Pairwise ({p['judge']}, the two answers in random order): the model's answer was better in "
                  f"{p['model_wins']} of {p['model_wins'] + p['baseline_wins']} ({cell(p['model_win_rate'])}); "
                  f"{p['unparsable']} unparsable" + ("" if p["first_shown_chosen"] is None else
                                                       f"; the judge chose the answer shown first "
                                                       f"{100 * p['first_shown_chosen']:.0f}% of the time") + "."]
    lines += disagreements(results, data)
    return "\n".join(lines) + "\n"


def disagreements(results, data):
    """The five answers the judge scored most differently for the model and the baseline (without a
    baseline: where the judge and ROUGE-L disagree most)."""
    if not data or "judge" not in results[0]["answers"]["summary"]:
        return []
    ours = results[0]["answers"]["examples"]
    theirs = results[1]["answers"]["examples"] if len(results) > 1 else None
    if theirs:
        title, gap = "the judge's scores of the model and the baseline differ most", \
            lambda i: abs(ours[i]["judge"] - theirs[i]["judge"])
        usable = [i for i in range(len(ours)) if ours[i]["judge"] is not None and theirs[i]["judge"] is not None]
    else:
        title, gap = "the judge and ROUGE-L disagree most", lambda i: abs(ours[i]["judge"] / 100 - ours[i]["rouge_l"])
        usable = [i for i in range(len(ours)) if ours[i]["judge"] is not None]
    lines = ["", f"## The five answers where {title}", ""]
    shown = [i for i in sorted(usable, key=gap, reverse=True) if gap(i) > 0][:5]
    lines += [] if shown else ["None: they agree on every answer.", ""]
    for rank, i in enumerate(shown, 1):
        record = data[1][i]
        lines += [f"### {rank}. test example {i}: judge {ours[i]['judge']}" +
                  (f" (model) vs {theirs[i]['judge']} (baseline)" if theirs else f", ROUGE-L {ours[i]['rouge_l']:.2f}"),
                  "", f"- instruction: {quote(record['instruction'])}"]
        lines += [f"- input: {quote(record['input'])}"] if record["input"] else []
        lines += [f"- reference: {quote(record['output'])}", f"- model: {quote(ours[i]['answer'])}"]
        lines += [f"- baseline: {quote(theirs[i]['answer'])}"] if theirs else []
        lines.append("")
    return lines


def quote(text, n=300):
    text = " ".join(text.split())
    return f"`{text[:n]}{'...' if len(text) > n else ''}`" if text else "(empty)"


def chart(results, path):
    """Bars of the metrics in [0, 1] per model, with their confidence intervals, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = table_rows(results[0])
    keys = [k for k in ("rouge_l", "token_f1", "exact_match", "judge", "acc", "acc_norm") if k in shown]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(keys), 3.6))
    width = 0.8 / len(results)
    for j, result in enumerate(results):
        rows = table_rows(result)
        scale = [0.01 if k == "judge" else 1 for k in keys]
        means = [(rows[k][0]["mean"] or 0) * s if k in rows else 0 for k, s in zip(keys, scale)]
        cis = [rows[k][0].get("ci95") if k in rows else None for k in keys]
        err = np.array([[m - ci[0] * s, ci[1] * s - m] if ci else [0, 0] for m, ci, s in zip(means, cis, scale)]).T
        ax.bar(np.arange(len(keys)) + j * width, means, width, yerr=err, capsize=3, label=result["model"])
    ax.set_xticks(np.arange(len(keys)) + width * (len(results) - 1) / 2)
    ax.set_xticklabels([LABELS[k].replace(" (0-100)", " / 100") for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1), ax.legend(fontsize=8)
    ax.set_title("higher is better; whiskers: 95% bootstrap CI", fontsize=9), fig.tight_layout()
    png = io.BytesIO()  # written whole or not at all, as every other file of the report
    fig.savefig(png, format="png"), plt.close(fig)
    atomic_write(path, [png.getvalue()])
    return True


def write_atomic(path, text):
    atomic_write(path, [text.encode("utf-8")])


def write_report(out, c, config, data, results, pairwise, seconds):
    out.mkdir(parents=True, exist_ok=True)
    if data:  # per test example: the record, each model's answer and scores, the pairwise verdict
        write_atomic(out / "answers.jsonl", "".join(json.dumps(
            {"index": i, **{k: record[k] for k in ("instruction", "input", "output")},
             **{side: r["answers"]["examples"][i] for side, r in zip(("model", "baseline"), results)},
             **({"pairwise": pairwise["examples"][i]} if pairwise else {})}, ensure_ascii=False) + "\n"
            for i, record in enumerate(data[1])))
    if c.hellaswag:
        write_atomic(out / "hellaswag.jsonl", "".join(
            json.dumps({"model": r["model"], **ex}) + "\n" for r in results for ex in r["hellaswag"]["examples"]))
    report = {"settings": config, "dataset": str(data[0]) if data else None, "seconds": round(seconds, 1),
              "machine": {"device": pick_device(c.device), "cpu": cpu_name(), "torch": torch.__version__},
              "models": [{k: v for k, v in r.items() if k not in ("answers", "hellaswag")} |
                         {part: r[part]["summary"] if r[part] else None for part in ("answers", "hellaswag")}
                         for r in results],
              "pairwise": {k: v for k, v in pairwise.items() if k != "examples"} if pairwise else None}
    write_atomic(out / "report.md", markdown(c, results, pairwise, data))
    drew = chart(results, out / "report.png")
    written = {"answers.jsonl": bool(data), "hellaswag.jsonl": c.hellaswag, "report.png": drew}
    for name in [n for n, wrote in written.items() if not wrote and c.overwrite]:  # not the old report's
        (out / name).unlink(missing_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")  # last: a folder with it is a report
    print(f"wrote {out / 'report.md'}, report.json{', report.png' if drew else ''} in {clock(seconds)}")


def main(config):
    c = checked(config, check_settings(config))
    out, start = Path(c.out_dir), time.time()
    if (out / "report.json").exists() and not c.overwrite:
        fail(f"{out / 'report.json'} is an earlier report: give another --out_dir, or --overwrite=True to replace it")
    try:
        tokenizer()  # offline without its files: said now, not after the test loss
    except OSError as e:
        fail(str(e))
    judge = start_judge(c) if c.judge else None  # an unreachable judge is found before any model is loaded
    swag = hellaswag_examples(c) if c.hellaswag else None  # and a download that fails
    c.device = pick_device(c.device)
    gpt, info = load(c.model, c.device, c.dtype)
    data = test_split(c, info) if c.answers else None
    if data and c.limit:
        data = (data[0], data[1][:c.limit])
    results = [evaluate(c.model, c, data, swag, (gpt, info))]
    del gpt, info  # one model in memory at a time
    if c.baseline:
        results.append(evaluate(c.baseline, c, data, swag))
    for result in results if judge and c.judge_mode in ("score", "both") else []:
        judge_scores(judge, data[1], result, c)
    pairwise = judge_pairs(judge, data[1], *results, c) if judge and c.judge_mode != "score" else None
    print(markdown(c, results, pairwise, data).split("\n## ")[0])
    write_report(out, c, config, data, results, pairwise, time.time() - start)
    if judge:
        judge.cache.close()


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:
        fail("interrupted: no report written (the judge's replies so far are cached: a rerun goes on from them)", 130)
