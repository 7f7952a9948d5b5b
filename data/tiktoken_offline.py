"""
Load tiktoken's "gpt2" encoding, also on a machine without internet.

tiktoken downloads the GPT-2 BPE files (encoder.json, vocab.bpe) on first use and
caches them under TIKTOKEN_CACHE_DIR (else DATA_GYM_CACHE_DIR, else
<tmp>/data-gym-cache), each file named by the sha1 of its URL. Offline that download
fails, so when the cache lacks the files we seed it from a local copy of the same
files, checked against the sha256 values that tiktoken itself expects:

  1. the folder given by the caller (e.g. a --bpe_dir flag), else
  2. the folder in the env var NANOMOE_GPT2_BPE_DIR, else
  3. <repo>/../shared/data/gpt2-bpe/ (the project's offline data).

With no local copy at all we leave it to tiktoken's own download (online case).
The files are byte-identical either way, so the encoding is the same.

Used by the GPT-2 BPE preparation scripts (data/shakespeare, data/openwebtext, data/fineweb).
"""

import hashlib
import os
import shutil
import tempfile
import uuid

BPE_DIR_ENV = "NANOMOE_GPT2_BPE_DIR"

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BPE_DIR = os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data", "gpt2-bpe"))

_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# file name -> sha256 (the hashes hard-coded in tiktoken_ext/openai_public.py, gpt2())
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# GPT-2 sanity check: nanoGPT's and OpenAI's well-known ids for "hello world"
HELLO_WORLD_IDS = [31373, 995]


def tiktoken_cache_dir():
    """The cache folder tiktoken will read (same rules as tiktoken.load.read_file_cached);
    None when caching is disabled (TIKTOKEN_CACHE_DIR set to an empty string)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        d = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return d or None


def cache_name(filename):
    """tiktoken's cache file name for one of the GPT-2 files: sha1 of its URL."""
    return hashlib.sha1((_BASE_URL + filename).encode()).hexdigest()


def _sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_is_complete(cache_dir):
    for fname, sha in GPT2_FILES.items():
        p = os.path.join(cache_dir, cache_name(fname))
        if not (os.path.isfile(p) and _sha256_of(p) == sha):
            return False
    return True


def _find_local_copy(bpe_dir=None):
    """First folder among (bpe_dir, $NANOMOE_GPT2_BPE_DIR, shared/data/gpt2-bpe) that holds
    both files with the right hashes. A folder the user named explicitly that is missing or
    wrong is an error; the shared default is optional."""
    candidates = []
    if bpe_dir:
        candidates.append((bpe_dir, "--bpe_dir"))
    if os.environ.get(BPE_DIR_ENV):
        candidates.append((os.environ[BPE_DIR_ENV], BPE_DIR_ENV))
    for folder, origin in candidates:
        for fname, sha in GPT2_FILES.items():
            p = os.path.join(folder, fname)
            if not os.path.isfile(p):
                raise FileNotFoundError(f"GPT-2 BPE file not found: {p} (from {origin})")
            if _sha256_of(p) != sha:
                raise ValueError(f"GPT-2 BPE file {p} (from {origin}) has the wrong sha256, expected {sha}")
        return folder
    if all(os.path.isfile(os.path.join(SHARED_BPE_DIR, f)) for f in GPT2_FILES):
        if all(_sha256_of(os.path.join(SHARED_BPE_DIR, f)) == sha for f, sha in GPT2_FILES.items()):
            return SHARED_BPE_DIR
    return None


def seed_tiktoken_cache(bpe_dir=None, verbose=True):
    """Copy the GPT-2 BPE files into tiktoken's cache if it lacks them (atomically).
    Returns the folder seeded from, or None when nothing was copied."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir is not None and _cache_is_complete(cache_dir):
        return None
    src = _find_local_copy(bpe_dir)
    if src is None:
        return None  # nothing local: tiktoken will try to download
    if cache_dir is None:
        # caching disabled by the user (TIKTOKEN_CACHE_DIR=""): point it at a private one
        cache_dir = tempfile.mkdtemp(prefix="tiktoken-cache-")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    os.makedirs(cache_dir, exist_ok=True)
    for fname in GPT2_FILES:
        dst = os.path.join(cache_dir, cache_name(fname))
        tmp = f"{dst}.{uuid.uuid4().hex}.tmp"
        shutil.copyfile(os.path.join(src, fname), tmp)
        os.replace(tmp, dst)
    if verbose:
        print(f"seeded tiktoken cache {cache_dir} with GPT-2 BPE files from {src}")
    return src


def gpt2_bpe_files(bpe_dir=None):
    """{'encoder.json': path, 'vocab.bpe': path} of GPT-2's BPE files (a Hugging Face GPT2Tokenizer's
    vocab.json and merges.txt): the local copy, else tiktoken's cache (downloaded into it if need be).
    RuntimeError if there are none."""
    src = _find_local_copy(bpe_dir)
    if src is not None:
        return {f: os.path.join(src, f) for f in GPT2_FILES}
    get_gpt2_encoding(bpe_dir, verbose=False)  # (downloads them into the cache)
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None or not _cache_is_complete(cache_dir):
        raise RuntimeError("GPT-2's BPE files are neither here nor in tiktoken's cache (caching is off)")
    return {f: os.path.join(cache_dir, cache_name(f)) for f in GPT2_FILES}


def get_gpt2_encoding(bpe_dir=None, verbose=True):
    """tiktoken.get_encoding("gpt2"), working offline; checks encode("hello world")."""
    import tiktoken

    seed_tiktoken_cache(bpe_dir, verbose=verbose)
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with neither a cache nor a local copy
        raise RuntimeError(
            "could not load tiktoken's 'gpt2' encoding: its download failed and no local copy of "
            f"encoder.json/vocab.bpe was found (looked in {SHARED_BPE_DIR}); pass --bpe_dir DIR or set "
            f"{BPE_DIR_ENV}=DIR ({type(e).__name__}: {e})"
        ) from e
    ids = enc.encode_ordinary("hello world")
    if ids != HELLO_WORLD_IDS:
        raise RuntimeError(f"gpt2 encoding sanity check failed: 'hello world' -> {ids}, "
                           f"expected {HELLO_WORLD_IDS}")
    return enc
