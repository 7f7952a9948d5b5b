"""
Prepare the Shakespeare dataset for character-level language modeling.
So instead of encoding with GPT-2 BPE tokens, we just map characters to ints.
Will save train.bin, val.bin containing the ids, and meta.pkl containing the
encoder and decoder and some other related info.

$ python data/shakespeare_char/prepare.py [path/to/input.txt]
Downloads tiny shakespeare; offline it uses the given path, else ../shared/data/tinyshakespeare/input.txt.
"""
import os
import sys
import pickle
import tempfile
import urllib.request

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
offline_copy = os.path.join(here, '..', '..', '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')


def atomic_write(path, write):
    """write(f) into a temp file next to path, then rename: never a half-written file under path. With the
    mode that open() would give it (mkstemp's is 0600: readable by its owner only)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def get_text():
    if len(sys.argv) > 2:
        sys.exit(f"usage: python {sys.argv[0]} [path/to/input.txt]")
    if len(sys.argv) == 2:
        source = sys.argv[1]
        if not os.path.isfile(source):
            fail(f"input file {source!r} not found")
    else:
        source = os.path.join(here, 'input.txt')
        if not os.path.exists(source):
            try:
                print(f"downloading {data_url}")
                with urllib.request.urlopen(data_url, timeout=10) as r:
                    text = r.read()
                atomic_write(source, lambda f: f.write(text))
            except OSError as e:
                print(f"download failed ({e}); using the offline copy {os.path.normpath(offline_copy)}")
                source = offline_copy
                if not os.path.isfile(source):
                    fail(f"no internet and no offline copy at {os.path.normpath(source)}; "
                         f"pass the path of tiny shakespeare's input.txt")
    try:
        with open(source, 'r', encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        fail(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})")


data = get_text()
print(f"length of dataset in characters: {len(data):,}")
if len(data) < 20:  # 10% of it is the validation split: it needs a few characters too
    fail(f"the input holds {len(data)} characters; at least 20 are needed")

# get all the unique characters that occur in this text
chars = sorted(list(set(data)))
vocab_size = len(chars)
if vocab_size > 2**16:  # the ids are written as uint16
    fail(f"the input has {vocab_size:,} distinct characters; at most 65,536 fit in uint16 ids")
print("all the unique characters:", ''.join(chars))
print(f"vocab size: {vocab_size:,}")

# create a mapping from characters to integers
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}


def encode(s):
    return [stoi[c] for c in s]  # encoder: take a string, output a list of integers


def decode(l):
    return ''.join([itos[i] for i in l])  # decoder: take a list of integers, output a string


# create the train and test splits
n = len(data)
train_data = data[:int(n * 0.9)]
val_data = data[int(n * 0.9):]

# encode both to integers
train_ids = encode(train_data)
val_ids = encode(val_data)
print(f"train has {len(train_ids):,} tokens")
print(f"val has {len(val_ids):,} tokens")

# export to bin files
atomic_write(os.path.join(here, 'train.bin'), lambda f: np.array(train_ids, dtype=np.uint16).tofile(f))
atomic_write(os.path.join(here, 'val.bin'), lambda f: np.array(val_ids, dtype=np.uint16).tofile(f))

# save the meta information as well, to help us encode/decode later
meta = {'vocab_size': vocab_size, 'itos': itos, 'stoi': stoi}
atomic_write(os.path.join(here, 'meta.pkl'), lambda f: pickle.dump(meta, f))

# length of dataset in characters:  1115394
# all the unique characters:
#  !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz
# vocab size: 65
# train has 1003854 tokens
# val has 111540 tokens
