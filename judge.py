"""
An LLM as judge: a bigger model scores answers through an HTTP API, the way "Build a LLM from scratch" ch07
scores its fine-tuned GPT-2 with Llama 3 through Ollama. Every answer the judge gives is cached on disk, so a
repeated evaluation costs nothing and an interrupted one goes on where it stopped.

    judge = Judge("ollama:llama3.1", cache=Cache("judge.jsonl"))    # Ollama's /api/chat at OLLAMA_HOST
    judge = Judge("openai:gpt-4o-mini", url="https://api.openai.com", key=os.environ["OPENAI_API_KEY"], cache=...)
    judge.check()                                                    # reachable, and it has the model?
    verdicts = score_answers(judge, records, answers)                # records: instruction, input, output
    verdicts[0].value     # 0-100, or None: unparsable twice (verdicts[0].text says what it answered)
    duels = compare_answers(judge, records, ours, theirs)            # which is better, each pair in random order

A reply that is not what the prompt asks for (an integer in 0-100, or the letter A or B) is asked again once
with a reminder, then counted as unparsable. The openai kind speaks OpenAI's /v1/chat/completions, which
llama.cpp's server, vLLM and nanoFT's serve.py speak too.
"""

import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import requests

from data import format_prompt

BACKOFF = 1.0  # seconds before the first retry, doubled after each
MAX_BODY = 1 << 20  # the most bytes of an HTTP answer read: a judge's reply is a few tokens
OPTIONS = {"temperature": 0, "seed": 123}  # the book's: the same answer every time, where the server allows

# the book's ch07 prompt (generate_model_scores), its input being the Alpaca prompt without the Response header
SCORE_PROMPT = ("Given the input `{input}` and correct output `{reference}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")
SCORE_REMINDER = "That is not an integer from 0 to 100. Respond with the integer number only."
PAIR_PROMPT = ("Given the input `{input}` and correct output `{reference}`, which of two model responses is "
               "better?\n\nResponse A: `{a}`\n\nResponse B: `{b}`\n\nRespond with the letter A or B only.")
PAIR_REMINDER = "Respond with the letter A or B only."


class JudgeError(RuntimeError):
    """A judge that cannot be used: unreachable, without the model, refusing; the message says what to do."""


# ----------------------------------------------------------------------------- prompts and replies

def book_input(instruction, input_text=""):
    """The input the book shows its judge: the Alpaca prompt up to the instruction (and input)."""
    return format_prompt(instruction, input_text).removesuffix("\n\n### Response:\n")


def parse_score(text):
    """The integer in 0-100 that a reply is (a trailing period allowed), else None."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*\.?\s*", text)
    return int(m[1]) if m and int(m[1]) <= 100 else None


def parse_choice(text):
    """'A' or 'B' if that is the whole reply (brackets, a period allowed), else None."""
    m = re.fullmatch(r"\s*\(?([AB])\)?\s*\.?\s*", text)
    return m[1] if m else None


@dataclass
class Job:
    prompt: str
    parse: callable
    reminder: str


def score_job(instruction, input_text, reference, response):
    return Job(SCORE_PROMPT.format(input=book_input(instruction, input_text), reference=reference,
                                   response=response), parse_score, SCORE_REMINDER)


def pair_job(instruction, input_text, reference, a, b):
    return Job(PAIR_PROMPT.format(input=book_input(instruction, input_text), reference=reference, a=a, b=b),
               parse_choice, PAIR_REMINDER)


@dataclass
class Verdict:
    value: object  # the parsed reply (an int score, 'A' or 'B'), or None when unparsable twice
    text: str  # the last reply
    reasked: bool


# ----------------------------------------------------------------------------- the cache

class Cache:
    """The judge's replies, one JSON line each ({"key", "judge", "reply"}), appended as they come. A torn last
    line (a run killed mid-write) is skipped when read and ended with a newline before the next append."""

    def __init__(self, path):
        self.path, self.replies, self.lock, self.unreadable = path, {}, threading.Lock(), 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.replies[entry["key"]] = str(entry["reply"])
                    except (ValueError, TypeError, KeyError):
                        self.unreadable += 1
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.path.getsize(path) and not self._ends_with_newline():
            os.write(self.fd, b"\n")

    def _ends_with_newline(self):
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def get(self, key):
        return self.replies.get(key)

    def put(self, key, judge, reply):
        line = json.dumps({"key": key, "judge": judge, "reply": reply}, ensure_ascii=False) + "\n"
        with self.lock:  # one write() of a whole line, with O_APPEND: lines never interleave
            self.replies[key] = reply
            os.write(self.fd, line.encode())

    def close(self):
        os.close(self.fd)


# ----------------------------------------------------------------------------- the judge


def ollama_url(host):
    """OLLAMA_HOST as Ollama's own client reads it: host, host:port or a URL, a path kept; the port defaults to
    11434 without a scheme, to 80 or 443 with http:// or https://."""
    scheme, sep, rest = host.strip().partition("://")
    if not sep:
        scheme, rest = "http", host.strip()
    port = {"http": 80, "https": 443}.get(scheme, 11434) if sep else 11434
    hostport, _, path = rest.partition("/")
    if hostport.startswith("["):  # [::1]:8080
        name, _, tail = hostport[1:].partition("]")
        port_text = tail.removeprefix(":")
    elif hostport.count(":") == 1:
        name, _, port_text = hostport.partition(":")
    else:  # no port; a bare IPv6 address has colons but none is a port's
        name, port_text = hostport, ""
    port = int(port_text) if port_text.isdigit() and int(port_text) < 65536 else port  # else the default, as Ollama
    name = name or "127.0.0.1"
    name = f"[{name}]" if ":" in name else name
    return f"{scheme}://{name}:{port}" + (f"/{path}".rstrip("/") if path.strip("/") else "")


class Judge:
    def __init__(self, spec, cache, url=None, key=None, timeout=120.0, retries=4, max_tokens=16):
        kind, _, self.model = spec.partition(":")
        if kind not in ("ollama", "openai") or not self.model:
            raise JudgeError(f"judge '{spec}' must be ollama:MODEL (e.g. ollama:llama3.1) or openai:MODEL")
        self.spec, self.kind, self.cache, self.key = spec, kind, cache, key
        self.timeout, self.retries, self.max_tokens = timeout, retries, max_tokens
        if kind == "ollama":
            self.url = ollama_url(url or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434")
        else:
            self.url = (url or "").rstrip("/").removesuffix("/v1")

    # --- talking to the server

    def how_to_start(self):
        if self.kind == "ollama":
            return (f"start Ollama with `ollama serve` and `ollama pull {self.model}` (or set OLLAMA_HOST to "
                    f"where it runs)")
        return "start the server (llama.cpp's llama-server, vllm serve, python serve.py) or give --judge_url"

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def check(self):
        """Stop early, with a JudgeError, if the judge cannot be reached or does not have the model."""
        path = "/api/tags" if self.kind == "ollama" else "/v1/models"
        try:
            r = requests.get(self.url + path, headers=self.headers(), timeout=min(self.timeout, 30), stream=True)
        except requests.RequestException as e:
            raise JudgeError(f"cannot reach the judge at {self.url} ({e.__class__.__name__}): "
                             f"{self.how_to_start()}") from None
        if r.status_code in (401, 403):
            raise JudgeError(self.refusal(r))
        body = read_json(r) if r.status_code == 200 else r.close()  # another answer: not this kind's API; go on
        if self.kind == "ollama" and isinstance(body, dict) and isinstance(body.get("models"), list):
            names = [m.get("name") for m in body["models"] if isinstance(m, dict)]
            wanted = self.model if ":" in self.model else self.model + ":latest"
            if wanted not in names and self.model not in names:
                raise JudgeError(f"Ollama at {self.url} has no model '{self.model}': run `ollama pull {self.model}`"
                                 f" (it has {', '.join(map(str, names)) or 'none'})")
        if self.kind == "openai" and isinstance(body, dict) and isinstance(body.get("data"), list):
            ids = [m.get("id") for m in body["data"] if isinstance(m, dict)]
            if ids and self.model not in ids:
                raise JudgeError(f"the judge at {self.url} does not serve a model '{self.model}'; it serves "
                                 f"{', '.join(map(str, ids[:10]))}: give --judge=openai:{ids[0]}")

    def request(self, messages):
        """(path, JSON body) of one chat request."""
        if self.kind == "ollama":
            return "/api/chat", {"model": self.model, "messages": messages, "stream": False,
                                 "options": {**OPTIONS, "num_ctx": 2048, "num_predict": self.max_tokens}}
        return "/v1/chat/completions", {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                        **OPTIONS}

    def reply_of(self, body):
        try:
            if self.kind == "ollama":
                text = body["message"]["content"]
            else:
                text = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise JudgeError(f"the judge at {self.url} answered something that is not a {self.kind} chat reply: "
                             f"{json.dumps(body)[:200]}")
        return text

    def refusal(self, r):
        """The one line for an answer that retrying will not change (401, 404, 400...)."""
        said = error_text(r)
        if r.status_code in (401, 403):
            return (f"the judge at {self.url} refused the request ({r.status_code} {r.reason}: {said}): set the "
                    f"API key in the environment variable that judge_key_env names")
        if r.status_code == 404 or "model" in said.lower():
            return (f"the judge at {self.url} has no model '{self.model}' ({r.status_code}: {said})"
                    + (f": run `ollama pull {self.model}`" if self.kind == "ollama" else ""))
        return f"the judge at {self.url} answered {r.status_code} {r.reason}: {said}"

    def ask(self, messages):
        """The judge's reply to a conversation: from the cache, else from the server (retried on dropped
        connections, timeouts, 429 and 5xx, waiting BACKOFF seconds, then twice as long each time)."""
        path, payload = self.request(messages)
        # the request itself is the key: another server, model, max_tokens or conversation is asked anew
        key = hashlib.sha256(json.dumps([self.url + path, payload], ensure_ascii=False).encode()).hexdigest()
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        for attempt in range(self.retries):
            try:
                r = requests.post(self.url + path, json=payload, headers=self.headers(), timeout=self.timeout,
                                  stream=True)
                if r.status_code == 200:
                    reply = self.reply_of(read_json(r))
                    self.cache.put(key, self.spec, reply)
                    return reply
                if r.status_code != 429 and r.status_code < 500:
                    raise JudgeError(self.refusal(r))
                last = f"{r.status_code} {r.reason}: {error_text(r)}"
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                timed_out = isinstance(e, requests.Timeout)
                last = e.__class__.__name__ + (f" after {self.timeout:g}s" if timed_out else "")
            if attempt < self.retries - 1:
                time.sleep(BACKOFF * 2 ** attempt)
        raise JudgeError(f"the judge at {self.url} did not answer after {self.retries} attempts (last: {last}); "
                         f"the replies so far are cached in {self.cache.path}: run again to go on from there")

    # --- judging

    def judge(self, job):
        """A Verdict on one job: asked once, and once more with the reminder if the reply does not parse."""
        messages = [{"role": "user", "content": job.prompt}]
        first = self.ask(messages)
        if job.parse(first) is not None:
            return Verdict(job.parse(first), first, False)
        second = self.ask(messages + [{"role": "assistant", "content": first},
                                      {"role": "user", "content": job.reminder}])
        return Verdict(job.parse(second), second, True)

    def run(self, jobs, concurrency=4):
        """Yield (index, Verdict) for jobs, as they finish, concurrency requests at a time. On an error or
        Ctrl-C the jobs not started are dropped (what was answered is in the cache) and it is raised."""
        pool = ThreadPoolExecutor(concurrency)
        futures = {pool.submit(self.judge, job): i for i, job in enumerate(jobs)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- judging answers to records

def verdicts(judge, jobs, concurrency=4, on_each=None):
    """The Verdicts on jobs, in their order; on_each() is called as each comes in."""
    got = [None] * len(jobs)
    for i, verdict in judge.run(jobs, concurrency):
        got[i] = verdict
        if on_each:
            on_each()
    return got


def score_answers(judge, records, answers, concurrency=4, on_each=None):
    """A Verdict (value 0-100, or None) on each answer to records ({'instruction', 'input', 'output'}). The book
    scores an empty answer 0 without asking."""
    asked = [i for i, a in enumerate(answers) if a]
    jobs = [score_job(records[i]["instruction"], records[i]["input"], records[i]["output"], answers[i]) for i in asked]
    scores = [Verdict(0, "", False)] * len(answers)
    for i, verdict in zip(asked, verdicts(judge, jobs, concurrency, on_each)):
        scores[i] = verdict
    return scores


def compare_answers(judge, records, ours, theirs, seed=1337, concurrency=4, on_each=None):
    """Which answer is better, ours[i] or theirs[i]: [{'ours_first', 'verdict', 'winner'}], winner 'ours',
    'theirs' or None (unparsable). Each pair is shown in a random (seeded) order: judges prefer a position, and
    showing ours first half of the time cancels that out on average."""
    rng = random.Random(seed)
    firsts = [rng.random() < 0.5 for _ in records]
    jobs = [pair_job(r["instruction"], r["input"], r["output"], *((o, t) if first else (t, o)))
            for r, o, t, first in zip(records, ours, theirs, firsts)]
    duels = []
    for first, v in zip(firsts, verdicts(judge, jobs, concurrency, on_each)):
        winner = None if v.value is None else "ours" if (v.value == "A") == first else "theirs"
        duels.append({"ours_first": first, "verdict": v, "winner": winner})
    return duels


def read_json(r):
    """The JSON of a streamed response, reading at most MAX_BODY bytes; None if it is not JSON or too long."""
    data = b""
    with r:
        for chunk in r.iter_content(1 << 16):  # requests' own exceptions, should the connection drop
            data += chunk
            if len(data) > MAX_BODY:
                return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def error_text(r):
    """What an error answer says (OpenAI's {"error": {"message"}}, Ollama's {"error"}), shortened."""
    body = read_json(r)
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:200] if error is not None else r.reason
