"""
Downloads that never leave a partial, corrupt or wrong file in place: every file is streamed to a .part file,
resumed after an interruption, checked (size, sha256, and what the caller says the content must be) and only
then renamed into place. A download that stalls or runs past its deadline gives up with a message. Used for
GPT-2's weights (load_gpt2.py) and the datasets (prepare.py).

    download("https://example.org/data.json", Path("data/mine/download/data.json"), check=parses_as_json)

NANOFT_DOWNLOAD_DEADLINE (seconds, default 6 hours for one file) and NANOFT_DOWNLOAD_MIN_RATE (bytes/s,
default 1000, averaged over 60 s) change the two give-up rules.
"""

import hashlib
import os
import re
import sys
import time
from pathlib import Path

import requests
import urllib3

RETRIES = 5  # attempts per download on a dropped connection or a 5xx answer
BACKOFF = 1.0  # seconds before the first retry, doubled after each
TIMEOUT = 30  # seconds without a byte before a connection counts as dropped
STALL_WINDOW = 60  # seconds over which the rate is judged


class DownloadError(RuntimeError):
    pass


class _Retryable(Exception):  # a 5xx answer or a stall: worth another attempt
    pass


def deadline():
    return setting_from_env("NANOFT_DOWNLOAD_DEADLINE", 6 * 3600, "seconds")


def min_rate():
    return setting_from_env("NANOFT_DOWNLOAD_MIN_RATE", 1000, "bytes per second")


def setting_from_env(name, default, unit):
    """A number from the environment variable name, or a DownloadError naming it."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text.strip() else float(default)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise DownloadError(f"{name}={text!r} must be a number of {unit}, 0 or more (unset it for {default})")
    return value


def download(url, dest, sha256=None, desc=None, check=None, max_bytes=None):
    """Fetch url into dest (a Path) unless it is already there; returns dest.

    The bytes go to dest + '.part' first; a .part left by an interrupted run is resumed with an HTTP Range
    request. The size, the sha256 (when given or announced by the server) and check(part) (a function that
    raises ValueError when the content is not what was asked for) must all pass before the rename, so dest only
    ever holds a complete, verified file. More than max_bytes is refused.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    made = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # removed again if nothing lands
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    desc, until = desc or dest.name, time.time() + deadline()
    try:
        for attempt in range(RETRIES):
            if time.time() > until:
                raise DownloadError(f"{desc}: the download ran past its deadline of {deadline():.0f} s "
                                    f"(NANOFT_DOWNLOAD_DEADLINE) while retrying; run again to go on")
            try:
                expected_sha, expected_size = _fetch(url, part, desc, sha256, until, max_bytes)
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.HTTPError, _Retryable) as e:  # urllib3's: a body broken off mid-read
                if attempt == RETRIES - 1:
                    kept = (f": the {part.stat().st_size:,} bytes already fetched are kept in {part} and will be "
                            f"resumed") if part.exists() and part.stat().st_size else ""
                    raise DownloadError(f"could not download {url} after {RETRIES} attempts ({e}); check your "
                                        f"network (or the address) and run again{kept}") from None
                wait = BACKOFF * 2 ** attempt
                print(f"\n{desc}: {e.__class__.__name__} ({e}); retrying in {wait:.0f}s", file=sys.stderr)
                time.sleep(wait)
        _verify(part, url, expected_size, expected_sha, check)
        os.replace(part, dest)
    finally:
        for folder in made:  # no empty folders left behind by a download that failed
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
    return dest


def _fetch(url, part, desc, sha256, until, max_bytes):
    """One attempt: stream url into part, appending to what is already there. Returns (sha256, size)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # the bytes as stored: sizes, ranges and sha256 refer to them
    if have:
        headers["Range"] = f"bytes={have}-"
    timeout = min(TIMEOUT, max(1.0, until - time.time()))  # no wait for a byte outlasts the deadline
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code in (401, 403, 404):
            raise DownloadError(f"{url} answered {r.status_code} ({r.reason}): check the name and the address; "
                                f"a gated or private file needs access rights")
        if r.status_code == 416 and have:  # nothing past what we have: complete, or a .part longer than the file
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return sha256 or _announced_sha256(r), have
            part.unlink()  # longer than the file, or no size to compare with: start over
            raise _Retryable(f"416: the partial file {part.name} did not fit the remote file; starting over")
        if r.status_code >= 500:
            raise _Retryable(f"{r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url} answered {r.status_code} ({r.reason}); expected the file")
        if r.status_code == 200:
            have = 0  # the server ignored our Range: start over
        elif not (sha256 or _announced_sha256(r)):  # nothing could tell whether the bytes kept are this file's
            part.unlink()
            raise _Retryable("no sha256 to check a partial file against: starting over")
        if r.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
            raise DownloadError(f"{url} was sent compressed (Content-Encoding: {r.headers['Content-Encoding']}) "
                                f"although asked not to be; nothing was kept")
        size = _total_size(r, have)
        if max_bytes and size and size > max_bytes:
            raise DownloadError(f"{url} is {size:,} bytes, more than the {max_bytes:,} this file can be")
        try:
            with open(part, "ab" if r.status_code == 206 else "wb") as f:
                _stream(r, f, desc, have, size, until, max_bytes)
        except _TooLarge:
            part.unlink()
            raise DownloadError(f"{url}: more than {max_bytes:,} bytes arrived, more than this file can be; "
                                f"nothing was kept") from None
        return sha256 or _announced_sha256(r), size


class _TooLarge(Exception):
    pass


def _stream(r, f, desc, have, size, until, max_bytes):
    """Copy the body into f as it arrives, with a progress line from its second second on; give up past
    max_bytes, past the deadline, or when fewer than min_rate() bytes/s arrived over the last STALL_WINDOW seconds
    (a trickle must not hold a run for hours)."""
    start = time.time()
    done, shown, printed, window = have, start + 0.5, False, [(start, have)]
    try:
        while chunk := r.raw.read1(1 << 16):  # whatever has arrived, up to 64 KB: a trickle is seen as one
            f.write(chunk)
            done, now = done + len(chunk), time.time()
            if max_bytes and done > max_bytes:
                raise _TooLarge
            if now > until:
                raise DownloadError(f"{desc}: the download ran past its deadline of {deadline():.0f} s "
                                    f"(NANOFT_DOWNLOAD_DEADLINE); {done:,} bytes are kept in {f.name}")
            window = [(t, n) for t, n in window if t > now - STALL_WINDOW] + [(now, done)]
            if now - start > STALL_WINDOW and (done - window[0][1]) / (now - window[0][0] or 1) < min_rate():
                raise _Retryable(f"fewer than {min_rate():.0f} bytes/s for {STALL_WINDOW} s "
                                 f"(NANOFT_DOWNLOAD_MIN_RATE)")
            if now - shown > 0.5:
                shown, printed = _progress(desc, done, size, have, start), True
    finally:
        if printed:  # the line ends before anything else is printed
            _progress(desc, done, size, have, start)
            print(file=sys.stderr)


def _announced_sha256(r):
    """The hub names an LFS file's sha256 in X-Linked-Etag (on the redirect) or ETag; a 64-hex etag is one."""
    for resp in [*r.history, r]:
        for h in ("X-Linked-Etag", "ETag"):
            tag = resp.headers.get(h, "").removeprefix("W/").strip('"')
            if re.fullmatch(r"[0-9a-f]{64}", tag):
                return tag
    return None


def _total_size(r, have):
    if r.status_code == 206 and "Content-Range" in r.headers:  # bytes start-end/total
        total = r.headers["Content-Range"].rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = r.headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None


def _progress(desc, done, size, have, start):
    rate = (done - have) / max(time.time() - start, 1e-6)
    if size:
        eta = (size - done) / rate if rate > 0 else 0
        msg = f"{desc}: {done / 1e6:.1f}/{size / 1e6:.1f} MB ({100 * done / size:.0f}%), {rate / 1e6:.1f} MB/s, ETA {eta:.0f}s"
    else:
        msg = f"{desc}: {done / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s"
    print("\r" + msg, end="", file=sys.stderr, flush=True)
    return time.time()


def _verify(part, url, size, sha256, check):
    """Never let a short, corrupt or wrong file be renamed into place: delete it and say so."""
    actual = part.stat().st_size
    if size is not None and actual != size:
        part.unlink()
        raise DownloadError(f"download of {url} is {actual} bytes but the server announced {size}; the "
                            f"partial file was deleted, run again to download it afresh")
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise DownloadError(f"download of {url} is corrupt: sha256 {actual} but expected "
                                f"{sha256}; the file was deleted, run again to download it afresh")
    try:
        if looks_like_html(part) and not url.lower().endswith((".html", ".htm")):
            raise ValueError("it is an HTML page (an error or login page?), not the file")
        if check:
            check(part)
    except Exception as e:  # whatever reading it raised: a hostile file has many ways to break a reader
        part.unlink()
        raise DownloadError(f"download of {url} is not what was asked for: {e}; nothing was kept") from None


def looks_like_html(path):
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
