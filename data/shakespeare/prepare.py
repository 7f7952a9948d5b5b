"""
Prepare tiny shakespeare for GPT-2 BPE training (nanoGPT's data/shakespeare).

    python data/shakespeare/prepare.py                  # download, else fall back to ../shared/data
    python data/shakespeare/prepare.py path/to/input.txt  # use this text file

Writes train.bin and val.bin (uint16 GPT-2 token ids, 90/10 split by characters) next
to this script, or into --out_dir. Offline, the download fails fast and the text and the
GPT-2 vocabulary are taken from <repo>/../shared/data/ (see data/tiktoken_offline.py).
Expected: train has 301,966 tokens, val has 36,059 tokens.
"""

import argparse
import os
import sys
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for prepare_common and tiktoken_offline
from prepare_common import die  # noqa: E402
from tiktoken_offline import BPE_DIR_ENV, get_gpt2_encoding  # noqa: E402

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHARED_INPUT = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare",
                                             "input.txt"))
OFFLINE_ENV = "NANOMOE_OFFLINE"  # set to 1 to skip any download attempt


def download(url, dst, timeout):
    """Download url to dst atomically (a temp file in the same folder, then os.replace)."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_input(args):
    """Path of the text to use: the one given, else input.txt here, else a download, else shared/."""
    if args.input is not None:
        if not os.path.isfile(args.input):
            die(f"input file not found: {args.input}")
        return args.input
    local = os.path.join(HERE, "input.txt")
    if os.path.isfile(local):
        return local
    offline = args.offline or os.environ.get(OFFLINE_ENV, "") not in ("", "0")
    if not offline:
        try:
            print(f"downloading {DATA_URL}")
            download(DATA_URL, local, args.timeout)
            return local
        except Exception as e:
            print(f"download failed ({type(e).__name__}: {e}); falling back to the offline copy")
    if os.path.isfile(SHARED_INPUT):
        return SHARED_INPUT
    die(f"no input: download failed or skipped and {SHARED_INPUT} is absent; pass the path of input.txt")


def write_bin(ids, path):
    """Write uint16 token ids to path atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        np.asarray(ids, dtype=np.uint16).tofile(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize tiny shakespeare with the GPT-2 BPE into "
                                            "train.bin/val.bin.")
    p.add_argument("input", nargs="?", default=None,
                   help="text file to use instead of downloading (default: download input.txt next to this "
                        "script, falling back to ../shared/data/tinyshakespeare/input.txt offline)")
    p.add_argument("--out_dir", default=HERE, help="where to write train.bin/val.bin (default: %(default)s)")
    p.add_argument("--offline", action="store_true", help=f"never try to download (also: {OFFLINE_ENV}=1)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="download timeout in seconds (default: %(default)s)")
    p.add_argument("--bpe_dir", default=None,
                   help=f"folder with GPT-2 encoder.json/vocab.bpe to seed tiktoken's cache when offline "
                        f"(also: {BPE_DIR_ENV}; default: ../shared/data/gpt2-bpe)")
    args = p.parse_args(argv)

    t0 = time.time()
    path = find_input(args)
    print(f"reading {path}")
    with open(path, "r", encoding="utf-8") as f:
        data = f.read()
    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9):]

    try:
        enc = get_gpt2_encoding(args.bpe_dir)
    except Exception as e:
        die(str(e))
    train_ids = enc.encode_ordinary(train_data)
    val_ids = enc.encode_ordinary(val_data)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    os.makedirs(args.out_dir, exist_ok=True)
    write_bin(train_ids, os.path.join(args.out_dir, "train.bin"))
    write_bin(val_ids, os.path.join(args.out_dir, "val.bin"))
    print(f"wrote train.bin, val.bin to {args.out_dir} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

# train.bin has 301,966 tokens
# val.bin has 36,059 tokens
