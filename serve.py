"""
Serve GPT-2 or a model fine-tuned by finetune.py behind an OpenAI-compatible API, with a chat page at /.

    python serve.py --model=out/alpaca/ckpt.pt              # http://127.0.0.1:8000/ ; the API at /v1
    python serve.py --model=gpt2 --port=0 --api_key=secret  # any free port; clients send the key

Endpoints: GET /v1/models, POST /v1/completions (prompt: text, texts, token ids), POST /v1/chat/completions
(messages), GET / (chat.html, the page beside this file), GET /health. A completion's prompt is used as it is;
a chat is folded into the checkpoint's prompt template as sample.py --chat folds it (generation.chat_ids): each
user message is an instruction in the template, each assistant message its answer closed by <|endoftext|>, a
system message plain text before the turns after it. A prompt longer than the context is cut from the left, as
in sample.py, and the response says so in "warnings".

Batching: one thread generates every request together on one KV cache. Rows (one per text: n per prompt) are
left-padded so that every row's tokens end in the same column; each step feeds every row's last token through
the model at once. A row leaves the batch as soon as it ends (and the padding nobody needs is cut off); waiting
rows join between two steps: their prompts are prefilled as a batch of their own, then their caches are put
beside the running ones. Each row picks its tokens with its own torch.Generator, as sample.py does with its one,
so a request with seed=s gives sample.py's text for --seed=s (its n texts: seeds s, s+1, ...).
"""

import json
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch

from batching import Closed, Engine, Job, QueueFull, Row
from configurator import checked, configure, fail
from data import EOT, tokenizer
from download import DownloadError
from generation import chat_ids, device_problem, fit_context, pick_device, template_of, weights_dtype
from load_gpt2 import load_model
from quantize import ready_for_generation

# -----------------------------------------------------------------------------
model = "gpt2"  # a GPT-2 name, a Hugging Face folder, a .safetensors file or finetune.py's ckpt.pt
name = ""  # the model's id in the API (clients pass it as model=); empty: the model setting as written
host = "127.0.0.1"  # the address to listen on; 0.0.0.0 opens the server to your whole network (see README)
port = 8000  # the TCP port; 0: any free one (the one taken is printed)
api_key = ""  # if set, every /v1 request must send the header Authorization: Bearer <api_key>
template = "auto"  # the chat's prompt template: auto (the checkpoint's own, if it has one), none, alpaca
max_batch = 16  # the most texts generated together, as rows of one batch
max_queue = 64  # the most requests waiting for a place in the batch; one more is answered 429
max_n = 16  # the most texts one request may ask for: n times the number of its prompts
max_tokens = 1024  # the most new tokens a request may ask for (never more than the model's context)
default_max_tokens = 256  # the max_tokens of a request that gives none
temperature = 0.8  # the temperature of a request that gives none (sample.py's default; OpenAI's is 1)
top_p = 0.95  # the top_p of a request that gives none (sample.py's default; OpenAI's is 1)
max_body = 1_000_000  # the largest request body in bytes; a larger one is answered 413
device = "auto"  # auto: cuda > mps > cpu
dtype = "auto"  # auto (float32 on the CPU, bf16 or fp16 on a GPU), float32, bfloat16 or float16
quantize = "none"  # none or int8 (int8 weights, as in sample.py)
compile_ = False  # torch.compile the one-token decode step (the first request waits for the compile)
# -----------------------------------------------------------------------------

PAGE = Path(__file__).with_name("chat.html")  # the chat page, kept as HTML beside this file
UNSUPPORTED = {"echo": False, "logprobs": False, "top_logprobs": 0, "best_of": 1, "frequency_penalty": 0,
               "presence_penalty": 0, "logit_bias": {}, "suffix": "", "tools": []}  # taken only at these values


def check_settings(c):
    problems = [f"{k}={c[k]} must be at least 1" for k in ("max_batch", "max_queue", "max_n", "max_tokens",
                                                            "default_max_tokens", "max_body") if c[k] < 1]
    if not 0 <= c["port"] <= 65535:
        problems.append(f"port={c['port']} must be from 0 to 65535")
    if not 0 <= c["temperature"] <= 2:
        problems.append(f"temperature={c['temperature']} must be from 0 (greedy) to 2")
    if not 0 < c["top_p"] <= 1:
        problems.append(f"top_p={c['top_p']} must be in (0, 1]")
    for key, allowed in (("template", ("auto", "none", "alpaca")), ("quantize", ("none", "int8")),
                         ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if c[key] not in allowed:
            problems.append(f"{key}='{c[key]}' must be one of {', '.join(allowed)}")
    return problems + [p for p in [device_problem(c["device"])] if p]


class ApiError(Exception):
    """An answer other than 200: an HTTP status and an OpenAI-style error that names the field at fault."""

    def __init__(self, status, message, param=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# ----------------------------------------------------------------------------- one request, checked

def field(body, key, default, kinds, ok, rule):
    """body[key], or default where it is absent or null; a 400 naming key unless it is of kinds and ok."""
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or not ok(value):
        raise ApiError(400, f"{key}={json.dumps(value)[:60]} is not valid: {key} must be {rule}", key)
    return value


def prompts_of(body, enc, vocab_size):
    """A completion's prompts as lists of token ids: prompt may be a text, texts, token ids or lists of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [enc.encode_ordinary(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [enc.encode_ordinary(p) for p in prompt]
        lists = prompt if all(isinstance(p, list) for p in prompt) else [prompt]
        if all(type(t) is int and 0 <= t < vocab_size for ids in lists for t in ids):
            return [list(ids) for ids in lists]
    raise ApiError(400, f"prompt must be a text, a list of texts, a list of token ids (each from 0 to {vocab_size - 1})"
                        " or a list of such lists", "prompt")


def messages_of(body):
    """A chat's messages as {"role", "content"} with content a text; developer counts as system."""
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages):
        raise ApiError(400, "messages must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    checked_messages = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text: a string or a list of text parts",
                           f"messages[{i}].content")
        checked_messages.append({"role": "system" if role == "developer" else role, "content": content})
    return checked_messages


def make_request(body, chat, srv):
    """The Request that body (an OpenAI-style completion or chat request) asks for, every field checked."""
    c, block_size = srv.c, srv.gpt.config.block_size
    if body.get("model") not in (None, srv.model_name):
        raise ApiError(400, f"model {json.dumps(body['model'])[:80]} is not served here: this server serves "
                            f"'{srv.model_name}' (GET /v1/models)", "model")
    for key, neutral in UNSUPPORTED.items():
        if body.get(key) not in (None, neutral):
            raise ApiError(400, f"{key} is not supported by this server (leave it out)", key)
    limit = min(c.max_tokens, block_size)
    new_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = field(body, new_key, min(c.default_max_tokens, limit), (int,), lambda v: 1 <= v <= limit,
                    f"a whole number from 1 to {limit}")
    sampling = (field(body, "temperature", c.temperature, (int, float), lambda v: 0 <= v <= 2, "a number from 0 to 2"),
                field(body, "top_k", None, (int,), lambda v: v >= 1, "a whole number of at least 1"),
                field(body, "top_p", c.top_p, (int, float), lambda v: 0 < v <= 1, "a number above 0, at most 1"))
    n = field(body, "n", 1, (int,), lambda v: 1 <= v <= c.max_n, f"a whole number from 1 to {c.max_n}")
    seed = field(body, "seed", None, (int,), lambda v: 0 <= v < 2 ** 62, "a whole number from 0 to 2**62 - 1")
    stop = field(body, "stop", [], (str, list), lambda v: v != "" if isinstance(v, str) else (
        len(v) <= 4 and all(isinstance(s, str) and s for s in v)), "a non-empty text or a list of up to 4 of them")
    request = Request(chat, field(body, "stream", False, (bool,), lambda v: True, "true or false"),
                      field(body, "stream_options", {}, (dict,), lambda v: True, "an object").get("include_usage"))
    prompts = [chat_ids(srv.enc, messages_of(body), srv.template)] if chat else prompts_of(body, srv.enc,
                                                                                            srv.gpt.config.vocab_size)
    if n * len(prompts) > c.max_n:
        raise ApiError(400, f"n={n} texts for each of {len(prompts)} prompts is more than max_n={c.max_n}", "n")
    stops, device = [stop] if isinstance(stop, str) else stop, srv.gpt.wte.weight.device
    for i, ids in enumerate(prompts):
        ids = fit_context(ids or [EOT], block_size, max_new, request.warnings.append)
        request.prompt_tokens += len(ids)
        for j in range(n):  # text j of a prompt: sample.py's with seed + j
            row_seed = None if seed is None else seed + j
            request.rows.append(Row(request, i * n + j, ids, min(max_new, block_size - len(ids)), sampling, row_seed,
                                    srv.enc, stops, device))
    return request


class Request(Job):
    """One HTTP request's texts (rows, see batching.Job) and what its answer needs besides them."""

    def __init__(self, chat, stream, include_usage):
        super().__init__()
        self.chat, self.stream, self.include_usage = chat, stream, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created, self.warnings, self.prompt_tokens = int(time.time()), [], 0


# ----------------------------------------------------------------------------- HTTP

def client_gone(sock):
    """True when the client has closed its end of the connection: readable, yet nothing to read."""
    try:
        return bool(select.select([sock], [], [], 0)[0]) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves a client's requests one after another
    timeout = 120  # seconds a connection may sit idle, or stall in the middle of a body, before it is closed

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def answer(self, route):
        """route(); an ApiError becomes an OpenAI-style error, anything else a 500 with no traceback in it."""
        self.started = False  # True once a stream's headers are out: too late for an error status
        with self.server.lock:
            self.server.in_flight += 1
        try:
            route()
        except ApiError as e:
            self.send_json(e.status, e.body())
        except OSError:  # the client went away
            self.close_connection = True
        except Exception:
            traceback.print_exc()
            self.close_connection = True
            if not self.started:
                self.send_json(500, ApiError(500, "internal error; the server's log has the details",
                                             kind="server_error").body())
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON too
        self.close_connection = True
        self.send_json(code, ApiError(code, message or self.responses.get(code, ("error",))[0]).body())

    def send_json(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def check_key(self):
        key = self.server.c.api_key
        given = self.headers.get("Authorization", "")
        if key and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "this server needs an API key: send the header Authorization: Bearer <key>",
                           kind="authentication_error")

    def get(self):
        path, srv = urlsplit(self.path).path, self.server
        if path in ("/", "/index.html"):
            if srv.page is None:
                raise ApiError(404, f"the chat page is missing: put chat.html beside {Path(__file__).name}")
            return self.send_json(200, srv.page, "text/html; charset=utf-8")
        if path == "/health":
            engine = srv.engine
            return self.send_json(200, {"status": "stopping" if engine.stopping else "ok", "model": srv.model_name,
                                        "generating": len(engine.rows), "waiting": len(engine.waiting)})
        if path == "/v1/models" or path.startswith("/v1/models/"):
            self.check_key()
            card = {"id": srv.model_name, "object": "model", "created": srv.started, "owned_by": "nanoft"}
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [card]})
            if unquote(path[len("/v1/models/"):]) == srv.model_name:
                return self.send_json(200, card)
            raise ApiError(404, f"no model '{unquote(path[len('/v1/models/'):])}' here; this server serves "
                                f"'{srv.model_name}'", "model")
        raise ApiError(404, f"there is no GET {path} here: try /, /health or /v1/models")

    def post(self):
        path, keep_alive = urlsplit(self.path).path, not self.close_connection
        self.close_connection = True  # until its body is read, the connection cannot take another request
        if path not in ("/v1/completions", "/v1/chat/completions"):
            raise ApiError(404, f"there is no POST {path} here: try /v1/completions or /v1/chat/completions")
        self.check_key()
        body = self.read_json()
        self.close_connection = not keep_alive
        request = make_request(body, path == "/v1/chat/completions", self.server)
        try:
            self.server.engine.submit(request)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error") from None
        except Closed as e:
            raise ApiError(503, str(e), kind="server_error") from None
        try:
            if request.stream:
                self.stream(request)
            else:
                self.reply(request)
        finally:
            request.cancelled = True  # gone or done: any row still in the batch leaves it

    def read_json(self):
        if self.headers.get_content_type() != "application/json":  # a web page elsewhere cannot send this unasked
            raise ApiError(415, "send the body as JSON, with the header Content-Type: application/json")
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not taken)")
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length: {length[:40]} is not a number of bytes")
        if int(length) > self.server.c.max_body:
            raise ApiError(413, f"the body is {length} bytes; this server takes at most {self.server.c.max_body} "
                                "(max_body)")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ApiError(400, f"the body is not valid JSON ({str(e)[:100]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def events(self, request):
        """The engine's reports on request as they come, until every row has ended. A client that hangs up
        cancels the request: its rows leave the batch at the next step."""
        ending = len(request.rows)
        while ending:
            if client_gone(self.connection):  # one select() a token: cheap
                raise ConnectionAbortedError("the client hung up")
            try:
                event = request.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if event[0] == "error":
                raise ApiError(503 if event[1] == "closed" else 500, event[2], kind="server_error")
            ending -= event[2] is not None
            yield event

    def reply(self, request):
        texts, finishes, tokens = {}, {}, {}
        for choice, text, finish, generated in self.events(request):
            texts[choice] = texts.get(choice, "") + text
            finishes[choice], tokens[choice] = finish, generated
        choices = [{"index": i, **self.content(request, texts.get(i, ""), done=True), "logprobs": None,
                    "finish_reason": finishes[i]} for i in range(len(request.rows))]
        self.send_json(200, self.envelope(request, choices, usage=self.usage(request, sum(tokens.values()))))

    def stream(self, request):
        """Server-sent events: one chunk per token that completes text (whole UTF-8 characters), then [DONE]."""
        self.send_response(200)
        for header, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                              ("Transfer-Encoding", "chunked")):
            self.send_header(header, value)
        self.end_headers()
        self.started, tokens = True, {}
        try:
            for choice, text, finish, generated in self.events(request):
                delta = self.content(request, text, done=False, first=choice not in tokens)
                chunk = {"index": choice, **delta, "logprobs": None, "finish_reason": finish}
                self.send_event(self.envelope(request, [chunk], chunk=True, warnings=not tokens))  # warnings: once
                tokens[choice] = generated
        except ApiError as e:  # the stream has begun: the error is its last event
            return self.send_event(e.body(), last=True)
        if request.include_usage:
            self.send_event(self.envelope(request, [], chunk=True, usage=self.usage(request, sum(tokens.values()))))
        self.send_event("[DONE]", last=True)

    def send_event(self, data, last=False):
        event = b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event) + (b"0\r\n\r\n" if last else b""))  # chunked

    @staticmethod
    def content(request, text, done, first=False):
        if not request.chat:
            return {"text": text}
        if done:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {"role": "assistant", "content": text} if first else {"content": text} if text else {}}

    def envelope(self, request, choices, chunk=False, usage=None, warnings=True):
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
        body = {"id": request.id, "object": kind, "created": request.created, "model": self.server.model_name,
                "choices": choices}
        if usage:
            body["usage"] = usage
        if request.warnings and warnings:
            body["warnings"] = request.warnings  # not OpenAI's: says the prompt was cut to fit the context
        return body

    @staticmethod
    def usage(request, completion_tokens):
        return {"prompt_tokens": request.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": request.prompt_tokens + completion_tokens}


class Server(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection never keeps the process from exiting
    block_on_close = False
    request_queue_size = 128  # connections the kernel holds until they are accepted (socketserver's 5 resets some)

    def __init__(self, c, gpt, template, enc):
        """Listen on c.host:c.port (port 0: any free one) and start the engine; serve_forever() serves."""
        super().__init__((c.host, c.port), Handler)
        self.c, self.gpt, self.template, self.enc = c, gpt, template, enc
        self.model_name, self.started = c.name or str(c.model), int(time.time())
        self.page = PAGE.read_bytes() if PAGE.exists() else None
        self.lock, self.in_flight, self.connections = threading.Lock(), 0, set()  # requests being answered
        self.engine = Engine(gpt, c.max_batch, c.max_queue)
        self.engine.thread.start()

    def stop(self, cancel=False, patience=10.0):
        """Once serve_forever has returned (Ctrl-C, or shutdown() from another thread): stop listening, stop the
        engine (it finishes the texts it is generating, unless cancel), give the handlers up to patience
        seconds to send their last bytes, then close the connections that clients keep open."""
        self.server_close()
        self.engine.stop(cancel)
        self.engine.thread.join()
        deadline = time.time() + patience
        while self.in_flight and time.time() < deadline:
            time.sleep(0.02)
        with self.lock:  # connections kept alive for a next request: closed, so that their threads end now
            idle = list(self.connections)
        for sock in idle:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while self.connections and time.time() < deadline:
            time.sleep(0.02)

    def get_request(self):
        sock, address = super().get_request()
        with self.lock:
            self.connections.add(sock)
        return sock, address

    def shutdown_request(self, request):
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)


def make_server(c):
    """Load the model c.model names, as sample.py runs it, and start a Server for it on c.host:c.port."""
    dev = pick_device(c.device)
    gpt, info = load_model(c.model, device=dev, dtype=weights_dtype(c.dtype, torch.device(dev).type))
    enc = tokenizer()
    ready_for_generation(gpt, c.quantize, c.compile)
    try:
        return Server(c, gpt, template_of(c.template, info["template"]), enc)
    except OSError as e:
        raise ValueError(f"cannot listen on {c.host}:{c.port} ({e.strerror or e}): is another server using the "
                         f"port? try --port=0") from None


def main(config):
    c = checked(config, check_settings(config))
    try:
        server = make_server(c)
    except (DownloadError, ValueError, OSError) as e:
        fail(str(e))
    host, port = server.server_address[:2]
    print(f"serving {server.model_name} at http://{host}:{port}/ (the chat page; the API at /v1"
          f"{', with the API key' if c.api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a plain kill stops gracefully too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where it started ignored (a background job)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("stopping: new requests are refused, waiting ones cancelled, texts being generated finished (Ctrl-C "
          "again cancels them)", file=sys.stderr, flush=True)
    try:
        server.stop()
    except KeyboardInterrupt:
        server.stop(cancel=True)
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(configure(globals()))
    except KeyboardInterrupt:  # Ctrl-C while loading or stopping: no traceback
        sys.exit(130)
