"""
Prepare FineWeb-Edu (default) or FineWeb for GPT-2 BPE training: the data of nanochat (FineWeb-Edu) and
of llm.c's GPT-2 (124M) reproduction and modded-nanogpt's speedrun (FineWeb).

    python data/fineweb/prepare.py --num_tokens=1B    # FineWeb-Edu sample-10BT: 10M val + 1B train tokens
    python data/fineweb/prepare.py                    # 10B train tokens: about the whole 10BT sample
    python data/fineweb/prepare.py --corpus=fineweb   # FineWeb's sample-10BT instead
    python data/fineweb/prepare.py --folder DIR --out_dir data/mine   # local parquet/jsonl shards, offline

Pipeline: HuggingFace `datasets` streams the documents in their published order (no HF cache: the first
tokens come in seconds, not after a download of the whole sample); --num_proc worker processes tokenise
them (tiktoken gpt2 encode_ordinary, then <|endoftext|> 50256 after each document); the main process
appends the ids, as uint16, first to val, then to train:

- val.bin: the first documents of the stream, until it holds --val_tokens (default 10M). Every
  --num_tokens gets the same val, so runs of different budgets are scored on one val set.
- train.bin: the documents after those, until it holds --num_tokens. Both end on a whole document:
  a file holds its budget plus at most one document.

Interruptions: the ids go to train.bin.partial and val.bin.partial, renamed only when complete, so
train.py never reads a half file. prepare_state.json records (every --save_every seconds, written
atomically after the ids it counts are on disk) the tokens written and the stream's position: the
same command again (after Ctrl-C, a kill, a lost connection) resumes there, dropping what was written
after it. A larger --num_tokens later extends train.bin to what preparing it at once gives, byte for
byte; --restart discards it all. Free disk space is checked before anything is read.

Local shards (--files, --folder): parquet or jsonl files with a 'text' column, as the hub's, read in the
order given (a folder's: sorted by name), through the same pipeline.
"""

import argparse
import collections
import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for prepare_common and tiktoken_offline
from prepare_common import EOT, collect_files, die  # noqa: E402
from tiktoken_offline import BPE_DIR_ENV, get_gpt2_encoding  # noqa: E402

HUB = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
SPLITS = ("val", "train")  # the order the stream fills them in
STATE = "prepare_state.json"
LOCAL_PATTERNS = ["*.parquet", "*.jsonl", "*.json"]
KILL_ENV = "NANOMOE_DEBUG_PREPARE_KILL_AT_CHUNK"  # tests only: SIGKILL once chunk N is written, before a save


def parse_count(text, flag):
    """'10B', '1.5M', '2e9', '10_000' -> an int >= 1 (K, M, B: thousand, million, billion)."""
    m = re.fullmatch(r"([0-9_.eE+]+)([kKmMbB]?)", text.strip())
    try:
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    except (AttributeError, ValueError):
        die(f"{flag}={text!r}: give a token count such as 1000000, 2e9, 500M or 10B")
    if not 1 <= n < 1e16:
        die(f"{flag}={text!r} must be at least 1 and below 1e16")
    return int(n)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stream FineWeb-Edu (default) or FineWeb, or local parquet/jsonl shards, into "
                    "train.bin/val.bin of GPT-2 BPE ids (uint16), resumably.")
    src = p.add_argument_group("input (default: FineWeb-Edu sample-10BT from the HuggingFace hub)")
    src.add_argument("--corpus", default="fineweb-edu", choices=sorted(HUB),
                     help="fineweb-edu (HuggingFaceFW/fineweb-edu) or fineweb (HuggingFaceFW/fineweb)")
    src.add_argument("--subset", default="sample-10BT",
                     help="the hub data set's configuration, e.g. sample-100BT (default: %(default)s)")
    src.add_argument("--files", nargs="+", default=None, metavar="FILE",
                     help="local .parquet or .jsonl/.json files with a 'text' column, read in this order")
    src.add_argument("--folder", default=None, help="a folder of such files, read in name order")
    src.add_argument("--glob", nargs="+", default=LOCAL_PATTERNS, metavar="PATTERN",
                     help="file patterns inside --folder (default: %(default)s)")
    p.add_argument("--out_dir", default=HERE, help="where train.bin/val.bin go (default: %(default)s)")
    p.add_argument("--num_tokens", default="10B", help="train tokens, e.g. 1B or 2e9 (default: %(default)s)")
    p.add_argument("--val_tokens", default="10M", help="val tokens, taken first (default: %(default)s)")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="tokenising processes; 1: in the main one (default: %(default)s)")
    p.add_argument("--chunk_docs", type=int, default=8192,
                   help="documents read and tokenised per step (default: %(default)s)")
    p.add_argument("--save_every", type=float, default=60.0,
                   help="seconds between saves of the progress, the work an interruption may cost; "
                        "0: after every chunk (default: %(default)s)")
    p.add_argument("--restart", action="store_true",
                   help="discard what --out_dir holds (train.bin, val.bin, a preparation in progress) first")
    p.add_argument("--bpe_dir", default=None,
                   help=f"folder with GPT-2 encoder.json/vocab.bpe to seed tiktoken's cache when offline "
                        f"(also: {BPE_DIR_ENV}; default: ../shared/data/gpt2-bpe)")
    args = p.parse_args(argv)
    args.num_tokens = parse_count(args.num_tokens, "--num_tokens")
    args.val_tokens = parse_count(args.val_tokens, "--val_tokens")
    for flag in ("num_proc", "chunk_docs"):
        if getattr(args, flag) < 1:
            die(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.save_every < 0:
        die(f"--save_every must be >= 0, got {args.save_every}")
    return args


def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


# ----------------------------------------------------------------------------- the source

def local_format(files):
    """'parquet' or 'json' (datasets' builder) for a list of local files of one kind."""
    kinds = set()
    for f in files:
        kind = "parquet" if f.endswith(".parquet") else "json" if re.search(r"\.jsonl?$", f) else None
        if kind is None:
            die(f"{f}: not a .parquet, .jsonl or .json file")
        kinds.add(kind)
    if len(kinds) > 1:
        die("the input files mix parquet and jsonl: give one kind")
    return kinds.pop()


def source_of(args, files):
    """What a preparation reads, as prepare_state.json records it: a resume must read the same."""
    if files is None:
        return {"dataset": HUB[args.corpus], "subset": args.subset}
    return {"files": [[os.path.basename(f), os.path.getsize(f)] for f in files]}


def describe(source):
    if "dataset" in source:
        return f"{source['dataset']} ({source['subset']})"
    names = [name for name, _ in source["files"]]
    return f"{len(names)} local file(s): {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def open_stream(args, files):
    """The documents as a streaming datasets.IterableDataset (only the 'text' column of parquet is read)."""
    os.environ.setdefault("USE_TORCH", "0")  # else datasets imports torch (seconds) to count streaming epochs
    from datasets import load_dataset

    try:
        if files is None:
            return load_dataset(HUB[args.corpus], name=args.subset, split="train", streaming=True,
                                columns=["text"])
        kind = local_format(files)
        return load_dataset(kind, data_files=files, split="train", streaming=True,
                            **({"columns": ["text"]} if kind == "parquet" else {}))
    except Exception as e:
        die(f"could not open {describe(source_of(args, files))} ({one_line(e)})" +
            ("; offline, use --files or --folder with local parquet/jsonl shards" if files is None else ""))


def read_chunks(ds, chunk_docs, position):
    """(position, texts) of the next chunk_docs documents, from `position` on: a stream state (None: the
    start) and how many documents after it to skip. datasets' state_dict() follows an iterator only
    once it has yielded, so a chunk's position is that state with the documents read since."""
    if position["stream"] is not None:
        ds.load_state_dict(position["stream"])
    it = iter(ds)
    try:
        for _ in itertools.islice(it, position["skip"]):
            pass
        read = position["skip"] > 0
        while True:
            if read:
                position = {"stream": ds.state_dict(), "skip": 0}
            try:
                texts = [doc["text"] for doc in itertools.islice(it, chunk_docs)]
            except KeyError:
                die("the documents have no 'text' column")
            if not texts:
                return
            read = True
            yield position, texts
    finally:
        it.close()  # now, not at exit, when a half-read parquet file's cleanup finds pyarrow gone


# ----------------------------------------------------------------------------- tokenising

def init_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def encode(texts):
    """Documents -> (their GPT-2 ids, each followed by <|endoftext|>, as one uint16 array; each one's
    length). Special-token text in a document is encoded as plain text."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")  # seeded and cached by main(), loaded once per process
    ids, lens = [], []
    for text in texts:
        doc = enc.encode_ordinary(text)
        doc.append(EOT)
        ids.extend(doc)
        lens.append(len(doc))
    return np.array(ids, dtype=np.uint16), np.array(lens, dtype=np.int64)


class Done:
    """The result of work done at once (--num_proc 1), as a pool's AsyncResult gives it."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def tokenised(chunks, pool, num_proc):
    """(position, [(ids, lengths) of each task]) of each chunk, in order: one chunk is tokenised while
    the next one is read."""
    pending = collections.deque()
    for position, texts in chunks:
        step = -(-len(texts) // (4 * num_proc))  # a few tasks per process: even loads
        tasks = [texts[i:i + step] for i in range(0, len(texts), step)]
        pending.append((position, pool.map_async(encode, tasks) if pool else Done(list(map(encode, tasks)))))
        if len(pending) == 2:
            position, result = pending.popleft()
            yield position, result.get()
    for position, result in pending:
        yield position, result.get()


# ----------------------------------------------------------------------------- the files

class Bins:
    """val.bin.partial and train.bin.partial, appended to at the counts that `state` records, and the
    state itself: saved after the ids it counts are on disk, so a saved state never counts lost ids."""

    def __init__(self, out_dir, state, val_tokens, num_tokens):
        self.out_dir, self.state = out_dir, state
        self.budget = {"val": val_tokens, "train": num_tokens}
        self.files = {}

    def path(self, split, partial=True):
        return os.path.join(self.out_dir, f"{split}.bin" + (".partial" if partial else ""))

    def file(self, split):
        """The open partial file of split, cut to the ids the state counts (a finished one is reopened)."""
        if split not in self.files:
            partial, n = self.path(split), self.state["tokens"][split]
            if not os.path.exists(partial) and os.path.exists(self.path(split, False)):
                os.replace(self.path(split, False), partial)  # extended, or renamed by an unfinished finish()
            if n and (not os.path.exists(partial) or os.path.getsize(partial) < 2 * n):
                die(f"{partial} holds fewer than the {n:,} tokens that {STATE} counts; --restart starts over")
            f = open(partial, "r+b" if n else "wb")
            f.truncate(2 * n)  # drop ids written after the last save
            f.seek(2 * n)
            self.files[split] = f
        return self.files[split]

    def full(self):
        return all(self.state["tokens"][s] >= self.budget[s] for s in SPLITS)

    def add(self, ids, lens):
        """Append the documents (ids, their lengths) in order: to val until it holds its budget, then to
        train until it does. Returns how many were taken: all, unless train filled up."""
        ends = np.cumsum(lens)
        taken = 0
        tokens = self.state["tokens"]
        while taken < len(lens) and not self.full():
            split = "val" if tokens["val"] < self.budget["val"] else "train"
            start = int(ends[taken - 1]) if taken else 0
            # up to and including the document that reaches the budget
            stop = min(len(lens), int(np.searchsorted(ends, start + self.budget[split] - tokens[split])) + 1)
            self.file(split).write(ids[start:ends[stop - 1]].tobytes())
            tokens[split] += int(ends[stop - 1]) - start
            self.state["docs"][split] += stop - taken
            taken = stop
        return taken

    def save(self, position):
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.state["position"] = position
        write_state(self.out_dir, self.state)

    def finish(self):
        """Cut the files to the ids the state counts (a run may have stopped after writing more, or between
        its last save and these renames), close them and give them their names."""
        for split in SPLITS:
            if os.path.exists(self.path(split)):
                self.file(split)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split in SPLITS:
            if os.path.exists(self.path(split)):
                os.replace(self.path(split), self.path(split, False))
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames too
        finally:
            os.close(fd)


def write_state(out_dir, state):
    path = os.path.join(out_dir, STATE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(out_dir):
    """One preparation in a folder at a time: two would interleave their ids."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            die(f"another prepare.py is writing to {out_dir}")
        yield
    finally:
        os.close(fd)


def begin(args, source):
    """The state to go on from: the saved one of an interrupted (or smaller) preparation of the same
    source and --val_tokens, else a fresh one. Anything else in out_dir is an error (--restart)."""
    names = [STATE] + [f"{s}.bin{p}" for s in SPLITS for p in ("", ".partial")]
    if args.restart:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.out_dir, name))
    path = os.path.join(args.out_dir, STATE)
    if not os.path.exists(path):
        if any(os.path.exists(os.path.join(args.out_dir, f"{s}.bin")) for s in SPLITS):
            die(f"{args.out_dir} holds train.bin/val.bin that no {STATE} describes; --restart replaces "
                "them, or choose another --out_dir")
        return {"source": source, "val_tokens": args.val_tokens, "tokens": {s: 0 for s in SPLITS},
                "docs": {s: 0 for s in SPLITS}, "exhausted": False, "position": {"stream": None, "skip": 0}}
    try:
        with open(path) as f:
            state = json.load(f)
        saved = (describe(state["source"]), state["val_tokens"], state["tokens"]["train"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"{path} is unreadable ({one_line(e)}); --restart starts afresh")
    if state["source"] != source or state["val_tokens"] != args.val_tokens:
        die(f"{args.out_dir} holds a preparation of {saved[0]} with --val_tokens={saved[1]}, not of "
            f"{describe(source)} with --val_tokens={args.val_tokens}; --restart discards it")
    return state


def check_free_space(out_dir, need):
    free = shutil.disk_usage(out_dir).free
    if need > free:
        die(f"the budget needs {need / 1e9:,.1f} GB more in {out_dir} (2 bytes a token), which has "
            f"{free / 1e9:,.1f} GB free; lower --num_tokens or choose another --out_dir")


def report(bins, t0, n_new):
    dt = time.time() - t0
    for split in SPLITS:
        print(f"{split}.bin has {bins.state['tokens'][split]:,} tokens "
              f"({bins.state['docs'][split]:,} documents)")
    print(f"done in {dt:.1f}s ({n_new / max(dt, 1e-9):,.0f} new tokens/s)")


def main(argv=None):
    args = parse_args(argv)
    files = None  # None: the hub; a missing local path fails here, before any work
    if args.files is not None or args.folder is not None:
        files = collect_files(args.files, args.folder, args.glob)
        local_format(files)
    os.makedirs(args.out_dir, exist_ok=True)
    with locked(args.out_dir):
        prepare(args, files)


def prepare(args, files):
    source = source_of(args, files)
    state = begin(args, source)
    bins = Bins(args.out_dir, state, args.val_tokens, args.num_tokens)
    t0, start_tokens = time.time(), sum(state["tokens"].values())
    if bins.full() or state["exhausted"]:
        bins.finish()
        print(f"{args.out_dir} is prepared already ({describe(source)})" +
              ("; the source holds no more documents" if state["exhausted"] else ""))
        report(bins, t0, 0)
        return
    check_free_space(args.out_dir, 2 * (args.val_tokens + args.num_tokens - start_tokens))
    if start_tokens:
        print(f"resuming: val {state['tokens']['val']:,} and train {state['tokens']['train']:,} tokens "
              f"written from {describe(source)}")
    try:
        get_gpt2_encoding(args.bpe_dir)  # seeds tiktoken's cache offline; the workers then find it
    except Exception as e:
        die(str(e))
    ds = open_stream(args, files)

    from tqdm import tqdm
    kill_at = int(os.environ.get(KILL_ENV, 0))
    pool = None
    if args.num_proc > 1:
        import multiprocessing
        pool = multiprocessing.Pool(args.num_proc, initializer=init_worker)
    bar = tqdm(total=args.val_tokens + args.num_tokens, initial=start_tokens, unit="tok", unit_scale=True,
               desc="tokenizing")
    position, saved_at = state["position"], time.time()
    with contextlib.closing(read_chunks(ds, args.chunk_docs, position)) as chunks, \
            pool or contextlib.nullcontext():
        for n_chunk, (pos, results) in enumerate(tokenised(chunks, pool, args.num_proc), 1):
            before = sum(state["tokens"].values())
            taken = sum(bins.add(ids, lens) for ids, lens in results)
            bar.update(sum(state["tokens"].values()) - before)
            position = {"stream": pos["stream"], "skip": pos["skip"] + taken}
            if n_chunk == kill_at:
                for f in bins.files.values():
                    f.flush()  # the worst case: the ids reached the disk, the state that counts them did not
                os.kill(os.getpid(), signal.SIGKILL)
            if bins.full():
                break
            if time.time() - saved_at >= args.save_every:
                bins.save(position)
                saved_at = time.time()
        else:
            state["exhausted"] = True
    bar.close()
    if state["tokens"]["train"] == 0:  # a source no larger than --val_tokens: nothing worth keeping
        for path in (bins.path("val"), os.path.join(args.out_dir, STATE)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        die(f"{describe(source)} holds {state['tokens']['val']:,} tokens, no more than --val_tokens="
            f"{args.val_tokens:,}: none are left for train")
    bins.save(position)
    bins.finish()
    if state["exhausted"] and not bins.full():
        print(f"the source ran out before --num_tokens={args.num_tokens:,}")
    report(bins, t0, sum(state["tokens"].values()) - start_tokens)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("prepare.py: interrupted; the same command resumes from the last save", file=sys.stderr)
        sys.exit(130)

# Read back with np.memmap(path, dtype=np.uint16, mode="r"); every document ends with 50256.
