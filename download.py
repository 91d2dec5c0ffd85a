"""
Downloads that never leave a partial or corrupt file in place: every file is streamed to a .part file, resumed
after an interruption, checked (size and sha256) and only then renamed into place. Used for GPT-2's weights
(load_gpt2.py) and the datasets (prepare.py).

    download("https://example.org/data.json", Path("data/mine/data.json"), sha256=None)
"""

import hashlib
import os
import re
import sys
import time
from pathlib import Path

import requests

RETRIES = 5  # attempts per download on a dropped connection or a 5xx answer
BACKOFF = 1.0  # seconds before the first retry, doubled after each
TIMEOUT = 30  # seconds without a byte before a connection counts as dropped


class DownloadError(RuntimeError):
    pass


def download(url, dest, sha256=None, desc=None):
    """Fetch url into dest (a Path) unless it is already there; returns dest.

    The bytes go to dest + '.part' first; a .part left by an interrupted run is resumed with an HTTP Range
    request. The size (and sha256, when given or announced by the server) is checked before the rename,
    so dest only ever holds a complete, verified file.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    desc = desc or dest.name
    for attempt in range(RETRIES):
        try:
            expected_sha, expected_size = _fetch(url, part, desc, sha256)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _ServerError) as e:
            if attempt == RETRIES - 1:
                raise DownloadError(f"could not download {url} after {RETRIES} attempts ({e}); check your "
                                    f"network (or the address) and run again: the {part.stat().st_size if part.exists() else 0} "
                                    f"bytes already fetched are kept in {part} and will be resumed") from None
            wait = BACKOFF * 2 ** attempt
            print(f"\n{desc}: {e.__class__.__name__} ({e}); retrying in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    _verify(part, url, expected_size, expected_sha)
    os.replace(part, dest)
    return dest


class _ServerError(Exception):
    pass


def _fetch(url, part, desc, sha256):
    """One attempt: stream url into part, appending to what is already there. Returns (sha256, size)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code in (401, 403, 404):
            raise DownloadError(f"{url} answered {r.status_code} ({r.reason}): check the name and the address; "
                                f"a gated or private file needs access rights")
        if r.status_code == 416 and have:  # nothing past what we have: the .part is already complete
            return sha256 or _announced_sha256(r), have
        if r.status_code >= 500:
            raise _ServerError(f"{r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            raise DownloadError(f"{url} answered {r.status_code} ({r.reason}); expected the file")
        if r.status_code == 200:
            have = 0  # the server ignored our Range: start over
        size = _total_size(r, have)
        mode = "ab" if r.status_code == 206 else "wb"
        with open(part, mode) as f:
            done, start, shown = have, time.time(), 0.0
            for chunk in r.iter_content(chunk_size=1 << 16):  # small chunks: little is lost to a dropped link
                f.write(chunk)
                done += len(chunk)
                if time.time() - shown > 0.5 or done == size:
                    shown = _progress(desc, done, size, have, start)
        print(file=sys.stderr)
        return sha256 or _announced_sha256(r), size


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


def _verify(part, url, size, sha256):
    """Never let a short or corrupt file be renamed into place: delete it and say so."""
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


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
