"""
Offline tests of the GPT-2 BPE data preparation scripts:
data/shakespeare/prepare.py, data/openwebtext/prepare.py and data/tiktoken_offline.py.

They read the project's offline data in <repo>/../shared/data/ and never touch the
network: downloads are switched off (NANOMOE_OFFLINE, HF_HUB_OFFLINE) and tiktoken's
cache is a fresh temp folder seeded from shared/data/gpt2-bpe.
"""

import glob
import hashlib
import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
SHAKESPEARE_TXT = os.path.join(SHARED, "tinyshakespeare", "input.txt")
GUTENBERG_DIR = os.path.join(SHARED, "gutenberg-nltk")
WIKITEXT = os.path.join(SHARED, "wikitext-2-raw", "wiki.test.raw")
BPE_DIR = os.path.join(SHARED, "gpt2-bpe")
SHAKESPEARE_PREPARE = os.path.join(REPO_ROOT, "data", "shakespeare", "prepare.py")
OWT_PREPARE = os.path.join(REPO_ROOT, "data", "openwebtext", "prepare.py")
EOT = 50256

pytestmark = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (SHAKESPEARE_TXT, GUTENBERG_DIR, WIKITEXT, BPE_DIR)),
    reason=f"offline data not found in {SHARED} (shared/ beside the repo)",
)


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for the prepare subprocesses: offline, private tiktoken and HF caches."""
    tmp = tmp_path_factory.mktemp("caches")
    e = dict(os.environ)
    e.update({
        "TIKTOKEN_CACHE_DIR": str(tmp / "tiktoken"),
        "HF_HOME": str(tmp / "hf"),
        "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NANOMOE_OFFLINE": "1",
        "PYTHONIOENCODING": "utf-8",
    })
    e.pop("NANOMOE_GPT2_BPE_DIR", None)
    e.pop("DATA_GYM_CACHE_DIR", None)
    return e


@pytest.fixture(scope="module")
def enc(env):
    """tiktoken gpt2 via data/tiktoken_offline.py, with the cache seeded in a temp folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
        mp.delenv("NANOMOE_GPT2_BPE_DIR", raising=False)
        helper = _load_module(os.path.join(REPO_ROOT, "data", "tiktoken_offline.py"), "_tiktoken_offline_t")
        encoding = helper.get_gpt2_encoding(verbose=False)
    return encoding


def run(script, *args, env, cwd=None):
    return subprocess.run([sys.executable, script, *map(str, args)], env=env, cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def read_bins(out_dir):
    return [np.fromfile(os.path.join(out_dir, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")]


def split_docs(tokens, enc):
    """Decode a token stream where every document ends with <|endoftext|>."""
    assert len(tokens) and tokens[-1] == EOT
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------- tiktoken offline

def test_gpt2_encoding_offline(env, enc):
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.eot_token == EOT and enc.n_vocab == 50257
    # the cache was seeded under tiktoken's own names: sha1 of the download URLs
    cache = env["TIKTOKEN_CACHE_DIR"]
    for name, sha1 in [("encoder.json", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"),
                       ("vocab.bpe", "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")]:
        cached = os.path.join(cache, sha1)
        assert os.path.isfile(cached)
        with open(cached, "rb") as a, open(os.path.join(BPE_DIR, name), "rb") as b:
            assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()


def test_bad_bpe_dir_is_a_clear_error(env, tmp_path):
    e = dict(env, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"))
    r = run(SHAKESPEARE_PREPARE, SHAKESPEARE_TXT, "--out_dir", tmp_path, "--bpe_dir", tmp_path / "nope",
            env=e)
    assert r.returncode == 2
    assert "GPT-2 BPE file not found" in r.stderr
    assert not os.path.exists(tmp_path / "train.bin")


# ----------------------------------------------------------------------------- shakespeare (BPE)

def test_shakespeare_bpe(env, enc, tmp_path):
    r = run(SHAKESPEARE_PREPARE, SHAKESPEARE_TXT, "--out_dir", tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "train has 301,966 tokens" in r.stdout and "val has 36,059 tokens" in r.stdout
    train, val = read_bins(tmp_path)
    assert (len(train), len(val)) == (301_966, 36_059)
    assert len(train) + len(val) == 338_025
    with open(SHAKESPEARE_TXT, encoding="utf-8") as f:
        text = f.read()
    # the bins are the encoding of the 90/10 character split, and round-trip to the text
    assert enc.decode(train.tolist()) + enc.decode(val.tolist()) == text
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_shakespeare_offline_fallback(env, tmp_path):
    # no input given, downloads switched off: input.txt next to the script or the shared copy
    r = run(SHAKESPEARE_PREPARE, "--out_dir", tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "downloading" not in r.stdout
    assert sum(len(a) for a in read_bins(tmp_path)) == 338_025


# ----------------------------------------------------------------------------- openwebtext pipeline

def _check_owt(out_dir, docs, enc):
    expected = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    train, val = read_bins(out_dir)
    assert len(train) > 0 and len(val) > 0
    assert len(train) + len(val) == expected
    # every document ends up, whole, in exactly one of the splits
    got = split_docs(train, enc) + split_docs(val, enc)
    assert sorted(got) == sorted(docs)
    # nothing but the two bins (no temp files left behind)
    assert sorted(os.listdir(out_dir)) == ["train.bin", "val.bin"]
    return len(train), len(val)


@pytest.mark.slow
def test_openwebtext_gutenberg_folder(env, enc, tmp_path):
    out = tmp_path / "out"
    r = run(OWT_PREPARE, "--folder", GUTENBERG_DIR, "--out_dir", out, "--num_proc", 2, env=env)
    assert r.returncode == 0, r.stderr
    books = sorted(f for f in glob.glob(os.path.join(GUTENBERG_DIR, "*.txt")) if "README" not in f)
    assert len(books) == 13
    docs = []
    for b in books:
        with open(b, encoding="utf-8") as f:
            docs.append(f.read())
    n_train, n_val = _check_owt(out, docs, enc)
    assert f"train.bin has {n_train:,} tokens" in r.stdout and f"val.bin has {n_val:,} tokens" in r.stdout


def test_openwebtext_wikitext_file(env, enc, tmp_path):
    out = tmp_path / "out"
    r = run(OWT_PREPARE, "--files", WIKITEXT, "--out_dir", out, "--num_proc", 1, "--val_fraction", 0.05,
            env=env)
    assert r.returncode == 0, r.stderr
    with open(WIKITEXT, encoding="utf-8") as f:
        lines = io.StringIO(f.read()).readlines()  # a single file: one document per line (kept "\n")
    _check_owt(out, lines, enc)


@pytest.mark.parametrize("script,args,msg", [
    (SHAKESPEARE_PREPARE, ["does/not/exist.txt"], "input file not found"),
    (OWT_PREPARE, ["--files", "does/not/exist.txt"], "input file not found"),
    (OWT_PREPARE, ["--files", SHAKESPEARE_TXT, "does/not/exist.txt"], "input file not found"),
    (OWT_PREPARE, ["--folder", "does/not/exist"], "input folder not found"),
])
def test_missing_input_is_a_clear_error(env, tmp_path, script, args, msg):
    r = run(script, *args, "--out_dir", tmp_path, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "does/not/exist" in lines[0]
    assert os.listdir(tmp_path) == []


def test_openwebtext_write_is_atomic(env, tmp_path):
    """A failure while writing a .bin leaves neither a partial file nor a temp file behind."""
    from datasets import Dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
        owt = _load_module(OWT_PREPARE, "_owt_prepare_t")
    good = Dataset.from_dict({"ids": [[1, 2, EOT], [3, EOT]], "len": [3, 2]})
    path = str(tmp_path / "train.bin")
    assert owt.write_bin(good, path, total_batches=1024) == 5
    assert np.fromfile(path, dtype=np.uint16).tolist() == [1, 2, EOT, 3, EOT]
    bad = Dataset.from_dict({"ids": [[7, 7, 7]], "len": [4]})  # claims one token more than it has
    with pytest.raises(RuntimeError):
        owt.write_bin(bad, path, total_batches=8)
    assert os.listdir(tmp_path) == ["train.bin"]  # the old file is untouched, no temp file left
    assert np.fromfile(path, dtype=np.uint16).tolist() == [1, 2, EOT, 3, EOT]


@pytest.mark.slow
def test_short_training_run_on_gutenberg_bins_lowers_the_loss(env, tmp_path):
    import json
    data = tmp_path / "gutenberg"
    r = run(OWT_PREPARE, "--folder", GUTENBERG_DIR, "--out_dir", data, "--num_proc", 2, env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=4",
            "--device=cpu", "--dtype=float32", "--compile=False", "--n_expert=4", "--top_k=2",
            "--expert_hidden=32", "--learning_rate=3e-3", "--warmup_iters=5", "--decay_lr=False",
            "--log_interval=10", "--gradient_accumulation_steps=1"]
    # a dataset may be given as a folder path holding train.bin/val.bin (no meta.pkl: GPT-2 vocab)
    r = run(os.path.join(REPO_ROOT, "train.py"), *tiny, f"--dataset={data}", f"--out_dir={out}",
            "--max_iters=40", "--eval_interval=40", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "log.jsonl") as f:
        evals = [rec for rec in map(json.loads, f) if "val/ce" in rec]
    assert [e["iter"] for e in evals] == [0, 40]
    assert evals[1]["val/ce"] < evals[0]["val/ce"] - 1.0, evals
