"""
Prepare OpenWebText (or local text files) for GPT-2 BPE training (nanoGPT's data/openwebtext).

    python data/openwebtext/prepare.py                     # OpenWebText from the HuggingFace hub
    python data/openwebtext/prepare.py --files a.txt b.txt  # local files, one document per file
    python data/openwebtext/prepare.py --folder some/dir    # every *.txt in a folder

Pipeline (the same for the hub data set and local files), all with HuggingFace `datasets`:
load -> train/val split (test_size=--val_fraction, seed=--seed, shuffled; 'test' renamed
'val') -> tokenize with map(num_proc=...) (tiktoken gpt2 encode_ordinary + <|endoftext|>
50256 after every document) -> write train.bin/val.bin as uint16 through a memmap, in
shards. Each .bin is written to a temp file in --out_dir and renamed at the end, so a
crash never leaves a half-written train.bin/val.bin behind.

OpenWebText: ~54 GB of HF cache, train.bin ~17 GB (~9B tokens), val.bin ~8.5 MB (~4M tokens).
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for prepare_common and tiktoken_offline
from prepare_common import EOT, collect_files, die  # noqa: E402
from tiktoken_offline import BPE_DIR_ENV, get_gpt2_encoding  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Tokenize OpenWebText (default) or local text files with the GPT-2 BPE into "
                    "train.bin/val.bin (uint16), through HuggingFace datasets.")
    src = p.add_argument_group("input (default: the 'openwebtext' data set from the HuggingFace hub)")
    src.add_argument("--dataset", default="openwebtext", help="hub data set name (default: %(default)s)")
    src.add_argument("--files", nargs="+", default=None, metavar="FILE", help="local UTF-8 text files")
    src.add_argument("--folder", default=None, help="a folder of local text files (see --glob, --exclude)")
    src.add_argument("--glob", default="*.txt", help="file pattern inside --folder (default: %(default)s)")
    src.add_argument("--exclude", nargs="*", default=["*README*"], metavar="PATTERN",
                     help="file name patterns to skip in --folder (default: %(default)s; "
                          "pass --exclude with no pattern to keep all)")
    src.add_argument("--sample_by", default="auto", choices=["auto", "document", "paragraph", "line"],
                     help="what one document (one <|endoftext|>) is for local files: a whole file, a "
                          "paragraph (split on blank lines) or a line. auto: document when there are "
                          "several files, line for a single file (default: %(default)s)")
    p.add_argument("--out_dir", default=HERE, help="where to write train.bin/val.bin (default: %(default)s)")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes for loading and tokenizing (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, default=0.0005,
                   help="fraction of documents for val, at least one (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2357, help="seed of the shuffled split (default: %(default)s)")
    p.add_argument("--total_batches", type=int, default=1024,
                   help="shards to write each .bin in (default: %(default)s)")
    p.add_argument("--cache_dir", default=None, help="HuggingFace datasets cache folder (default: HF's own)")
    p.add_argument("--bpe_dir", default=None,
                   help=f"folder with GPT-2 encoder.json/vocab.bpe to seed tiktoken's cache when offline "
                        f"(also: {BPE_DIR_ENV}; default: ../shared/data/gpt2-bpe)")
    args = p.parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        die(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    if args.num_proc < 1:
        die(f"--num_proc must be >= 1, got {args.num_proc}")
    if args.total_batches < 1:
        die(f"--total_batches must be >= 1, got {args.total_batches}")
    return args


def load_splits(args, files):
    """DatasetDict with 'train' and 'val', each with one 'text' column."""
    from datasets import load_dataset

    if files is None:
        print(f"loading {args.dataset!r} from the HuggingFace hub (num_proc={args.num_proc})")
        try:
            dataset = load_dataset(args.dataset, num_proc=args.num_proc, cache_dir=args.cache_dir)
        except Exception as e:
            die(f"could not load data set {args.dataset!r} ({type(e).__name__}: {e}); "
                "offline, use --files or --folder with local text files")
    else:
        sample_by = args.sample_by
        if sample_by == "auto":
            sample_by = "document" if len(files) > 1 else "line"
        print(f"loading {len(files)} local file(s), sample_by={sample_by} (num_proc={args.num_proc})")
        try:
            dataset = load_dataset("text", data_files=files, sample_by=sample_by, keep_linebreaks=True,
                                   num_proc=min(args.num_proc, len(files)), cache_dir=args.cache_dir)
        except Exception as e:
            die(f"could not read the input files ({type(e).__name__}: {e})")

    ds = dataset["train"]
    if len(ds) < 2:
        die(f"need at least 2 documents for a train/val split, got {len(ds)}; "
            "give more files or use --sample_by line/paragraph")
    # the hub data set and local files both come as a single 'train' split: carve val out of it
    split_dataset = ds.train_test_split(test_size=args.val_fraction, seed=args.seed, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    for split, dset in split_dataset.items():
        print(f"{split}: {len(dset):,} documents")
    return split_dataset


def process(example):
    """One document -> its GPT-2 ids (special-token text is encoded as plain text) + <|endoftext|>."""
    # looked up by name (tiktoken caches it after main() loaded it) rather than captured, so that
    # datasets fingerprints this function cheaply and deterministically (cached map() on re-runs)
    import tiktoken

    ids = tiktoken.get_encoding("gpt2").encode_ordinary(example["text"])
    ids.append(EOT)
    return {"ids": ids, "len": len(ids)}


def write_bin(dset, filename, total_batches):
    """Concatenate all ids of dset into a uint16 memmap at filename, written atomically:
    the data goes to a temp file in the same folder, renamed to filename only when complete.
    Written in total_batches contiguous shards of documents (a progress bar step each)."""
    import pyarrow.compute as pc
    from tqdm import tqdm

    arr_len = int(np.sum(dset.with_format("numpy", columns=["len"])["len"], dtype=np.uint64))
    tmp = os.path.join(os.path.dirname(filename), f".{os.path.basename(filename)}.{os.getpid()}.tmp")
    ids = dset.with_format("arrow", columns=["ids"])  # slices are pyarrow tables: no per-row python
    n_docs = len(dset)
    total_batches = max(1, min(total_batches, n_docs))
    try:
        arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(arr_len,))
        idx = 0
        for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}"):
            # documents [start, stop): contiguous shard batch_idx of total_batches
            start = batch_idx * n_docs // total_batches
            stop = (batch_idx + 1) * n_docs // total_batches
            arr_batch = pc.list_flatten(ids[start:stop]["ids"]).to_numpy().astype(np.uint16, copy=False)
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        if idx != arr_len:
            raise RuntimeError(f"wrote {idx} tokens to {filename}, expected {arr_len}")
        arr.flush()
        del arr
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return arr_len


def main(argv=None):
    args = parse_args(argv)
    files = None  # None: the hub data set; a missing local path fails here, before the heavy imports
    if args.files is not None or args.folder is not None:
        files = collect_files(args.files, args.folder, [args.glob], args.exclude)
    t0 = time.time()
    try:
        get_gpt2_encoding(args.bpe_dir)  # seeds tiktoken's cache offline; process() then finds it
    except Exception as e:
        die(str(e))
    from datasets import Features, Value
    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List

    split_dataset = load_splits(args, files)
    # tokenize the dataset; ids as uint16 keeps the HF cache 4x smaller than int64
    features = Features({"ids": List(Value("uint16")), "len": Value("int64")})
    tokenized = split_dataset.map(process, remove_columns=["text"], features=features,
                                  desc="tokenizing the splits", num_proc=args.num_proc)

    # one flat uint16 token stream per split
    os.makedirs(args.out_dir, exist_ok=True)
    for split in ("train", "val"):
        n = write_bin(tokenized[split], os.path.join(args.out_dir, f"{split}.bin"), args.total_batches)
        print(f"{split}.bin has {n:,} tokens")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

# OpenWebText, as reported by nanoGPT: train.bin ~17 GB (~9.0B tokens), val.bin ~8.5 MB (~4.4M tokens).
# Read back with np.memmap(path, dtype=np.uint16, mode="r").
