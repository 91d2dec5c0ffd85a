"""
A training run's files in its out_dir, kept safe: the out_dir claimed by one run at a time, checkpoints written
whole or not at all (and what a full disk means said in one line), the state a resume needs and the settings it
goes on with, and log.jsonl, only ever appended to. finetune.py and classify.py use it through training.py's
neighbours; nothing here knows which script runs.

    claim_out_dir(out, resume=False, overwrite=False)     # refuses an earlier run's results, locks out_dir
    save_atomic({"model": ..., **training_state(optimizer, scaler, it)}, out / "ckpt.pt")
"""

import atexit
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from configurator import fail
from weights import temp_beside


# ----------------------------------------------------------------------------- the out_dir

RESULTS = ("ckpt.pt", "best.pt", "log.jsonl", "test_responses.json", "loss.png", "metrics.json", "accuracy.png")


def check_out_dir(out, resume, overwrite):
    """Refuse, before any work, an out_dir that holds an earlier run's results when neither resume=True (go on
    with them) nor overwrite=True (replace them) is said, and results that are no plain files (a link could lead a
    write outside out_dir). Returns the results found."""
    if out.exists() and not out.is_dir():
        fail(f"out_dir {out} is a file, not a folder: choose another --out_dir")
    found = [name for name in RESULTS if (out / name).exists() or (out / name).is_symlink()]
    odd = [name for name in found if (out / name).is_symlink() or not (out / name).is_file()]
    if odd:
        fail(f"{out} holds {', '.join(odd)} as a link or a folder, not a file this project wrote: remove "
             f"{'it' if len(odd) == 1 else 'them'}, or choose another --out_dir")
    if found and not (resume or overwrite):
        fail(f"{out} already holds an earlier run's {', '.join(found)}: continue that run with --resume=True, start "
             f"over there with --overwrite=True (replaces them), or choose another --out_dir")
    return found


def claim_out_dir(out, resume, overwrite):
    """Make out the folder of this run (on rank 0, once the model is loaded, before anything is written there):
    check_out_dir's rules, then out/run.lock, holding this process's id, refuses a second run into the same folder
    while this one lives; with overwrite=True, the earlier run's results are deleted now."""
    found = check_out_dir(out, resume, overwrite)
    lock = out / "run.lock"
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = lock.read_text().strip() if lock.is_file() and not lock.is_symlink() else ""
            if pid.isdigit() and process_alive(int(pid)):
                fail(f"another run (process {pid}) is writing to {out}: wait for it to end, or use another --out_dir "
                     f"(if no such run exists, delete {lock})")
            if lock.is_dir() and not lock.is_symlink():
                fail(f"{lock} is a folder: remove it, or choose another --out_dir")
            lock.unlink()  # left by a run that was killed: take it over
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        if overwrite:
            for name in found:
                (out / name).unlink()
    except OSError as e:
        fail(f"could not take {out} for this run ({e.strerror or e}): check that it is a folder you can write to")
    atexit.register(lambda: lock.unlink(missing_ok=True) if lock.is_file() and lock.read_text() == str(os.getpid())
                    else None)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def resumed_config(config, ckpt, given, may_change, path):
    """The settings a resumed run goes on with: the checkpoint's, except the ones given now (on the command line
    or in a config file) that may change (may_change: extend or adjust the run); a given setting that contradicts
    the checkpoint is refused. Changes are printed."""
    saved, merged, changes, refused = ckpt["config"], dict(config), [], []
    for key, old in saved.items():
        if key not in config:
            continue  # a setting this version of the script no longer has
        if key not in given or config[key] == old:
            merged[key] = old
        elif key in may_change:
            changes.append(f"{key} {old!r} -> {config[key]!r}")
        else:
            refused.append(f"{key}={config[key]!r} (it was {old!r})")
    if refused:
        fail(f"{path} cannot go on with {', '.join(refused)}: those settings must stay as the run began; leave them "
             f"out to take them from the checkpoint, or start a new run in another --out_dir. May change: "
             f"{', '.join(sorted(may_change))}")
    if changes:
        print(f"resuming {path} at iteration {ckpt['iter_num']} with {'; '.join(changes)}")
    return merged


# ----------------------------------------------------------------------------- checkpoints

class SaveError(OSError):
    pass


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write never leaves a broken checkpoint. When the
    disk is full or the folder is not writable, the temp file is removed, the previous file stays as it was,
    and a SaveError says how much room was needed."""
    path, tmp, stream = Path(path), None, None
    try:
        fd, tmp = temp_beside(path)
        with os.fdopen(fd, "wb") as f:
            stream = WriteErrors(f)
            torch.save(obj, stream)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's C++ writer reports a failed write as a RuntimeError
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        e = stream.error if stream and stream.error else e
        if not isinstance(e, OSError):
            raise
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise SaveError(f"could not write {path} ({e.strerror or e}): it needs about {tensor_bytes(obj) / 1e6:,.0f} "
                        f"MB and {free / 1e6:,.0f} MB are free there; the previous {path.name}, if any, is as it was"
                        ) from None


class WriteErrors:
    """A file whose failed write is kept (error), since torch.save turns it into a RuntimeError without it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def training_state(optimizer, scaler, it):
    """What a checkpoint needs, besides the model and the settings, to continue exactly."""
    return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": it, "rng": rng_state()}


def restore_training_state(ckpt, optimizer, scaler, path):
    """Put a checkpoint's optimizer, scaler and RNG state back; returns the iteration to go on from."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    except Exception as e:  # a hostile or mismatched state: any error torch raises about it
        fail(f"{path}: its optimizer, scaler or RNG state does not fit this model ({e.__class__.__name__}: "
             f"{str(e)[:150]}); start a new run in another --out_dir")
    return ckpt["iter_num"]


def rng_state():
    # data order comes from seeded numpy generators; only torch's RNG (dropout) carries state
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def read_resume_checkpoint(out, fields):
    """out/ckpt.pt as a dict to resume from, its training state checked (fields: {key: type} a script adds),
    or a one-line error."""
    from load_gpt2 import read_checkpoint
    path = out / "ckpt.pt"
    if not path.exists():
        fail(f"resume=True but there is no checkpoint at {path}: give the --out_dir (or --dataset) of the run to "
             f"continue, or run without resume to start a new one")
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        fail(f"could not read {path} to resume ({e}); run without resume=True, or with another out_dir, to start "
             f"a new run")
    expected = {"optimizer": dict, "scaler": dict, "iter_num": int, "rng": dict, "config": dict, "meta": dict,
                **fields}
    wrong = [k for k, kind in expected.items() if not isinstance(ckpt.get(k), kind)]
    if wrong:
        fail(f"{path} cannot be resumed: its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} missing or "
             f"not what a checkpoint of this script holds; use another --out_dir")
    return ckpt


# ----------------------------------------------------------------------------- the log

class RunLog:
    """log.jsonl, one record a line, only ever appended to. A resumed run adds a {'resumed': True} record at its
    checkpoint's iteration: what an interrupted run logged after that point is redone, and read_log leaves it out."""

    def __init__(self, out, start_iter=0, resumed=False, wandb=None):
        self.path, self.wandb = out / "log.jsonl", wandb
        self.records = read_log(self.path) if resumed else []
        self.torn = resumed and self.path.is_file() and self.path.stat().st_size and not ends_line(self.path)
        if resumed:
            self.records = [r for r in self.records if r["iter"] <= start_iter]
            self.write({"iter": start_iter, "resumed": True})

    def write(self, record):
        if not record.get("resumed"):
            self.records.append(record)
        line = ("\n" if self.torn else "") + json.dumps(record) + "\n"  # a torn last line gets its own
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a") as f:
                f.write(line)
        except OSError as e:
            fail(f"could not append to {self.path} ({e.strerror or e}): free some disk space; the checkpoints "
                 f"written so far are intact", status=1)
        self.torn = False
        if self.wandb:
            self.wandb.log(record, step=record["iter"])


def ends_line(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


MAX_LOG = 1 << 30  # a log.jsonl larger than 1 GB is no log of ours


def read_log(path):
    """The records of a log.jsonl as the run stands: a torn line (a crash mid-write) is skipped with a note,
    and what came after a resume's iteration before that resume is left out."""
    records, path = [], Path(path)
    if not path.exists():
        return records
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_LOG:
        fail(f"{path} is not a log this project wrote (a link, not a file, or over {MAX_LOG:,} bytes): move it away")
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iter"), (int, float)):
                raise ValueError("not a log record")
        except (ValueError, RecursionError):
            print(f"note: line {n} of {path} is not a whole record (a crash while writing?): skipped", file=sys.stderr)
            continue
        if record.get("resumed"):
            records = [r for r in records if r["iter"] <= record["iter"]]
        else:
            records.append(record)
    return records
