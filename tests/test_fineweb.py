"""
data/fineweb/prepare.py on small FineWeb-shaped parquet and jsonl shards made here, and the FineWeb
configs (config/train_fineweb_*.py). Offline: local files, tiktoken's cache seeded from
../shared/data/gpt2-bpe, and the hub's path tested with datasets.load_dataset replaced.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, run as run_script

PREPARE = os.path.join(ROOT, "data", "fineweb", "prepare.py")
BPE_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "gpt2-bpe"))
EOT = 50256
V, N = 3000, 30000  # val and train budgets: about 15 and 140 of the 300 documents below

pytestmark = pytest.mark.skipif(not os.path.isdir(BPE_DIR), reason=f"GPT-2 BPE files not found in {BPE_DIR}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, with private tiktoken and HF caches."""
    tmp = tmp_path_factory.mktemp("caches")
    e = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp / "tiktoken"), "HF_HOME": str(tmp / "hf"),
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    e.pop("NANOMOE_GPT2_BPE_DIR", None)
    return e


@pytest.fixture(scope="module")
def enc(env):
    import tiktoken
    from data.tiktoken_offline import seed_tiktoken_cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
        seed_tiktoken_cache(verbose=False)
        return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """300 documents in FineWeb-Edu's schema, as 2 parquet files (row groups of 16) and 2 jsonl files:
    empty ones, non-ASCII, newlines, and the text '<|endoftext|>', which must stay plain text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = ["the", "school", "learning", "photosynthesis", "naïve", "café", "日本語", "🙂", "<|endoftext|>",
             "\n", "\n\n", "  ", "data,", "x = 1;", "Übung", "’s"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 250))) for _ in range(300)]
    docs[3] = docs[200] = ""
    cols = {"text": docs, "id": [f"<urn:uuid:{i}>" for i in range(300)], "dump": ["CC-MAIN-2024-10"] * 300,
            "url": [f"https://example.org/{i}" for i in range(300)], "language": ["en"] * 300,
            "score": [rng.uniform(2.5, 5) for _ in range(300)], "token_count": [0] * 300}
    root = tmp_path_factory.mktemp("shards")
    (root / "parquet").mkdir()
    (root / "jsonl").mkdir()
    table = pa.table(cols)
    for i, (a, b) in enumerate([(0, 170), (170, 300)]):
        pq.write_table(table.slice(a, b - a), root / "parquet" / f"00{i}_00000.parquet", row_group_size=16)
        with open(root / "jsonl" / f"00{i}.jsonl", "w", encoding="utf-8") as f:
            for j in range(a, b):
                f.write(json.dumps({k: v[j] for k, v in cols.items()}) + "\n")
    return SimpleNamespace(docs=docs, parquet=str(root / "parquet"), jsonl=str(root / "jsonl"))


def expected(docs, enc, val_tokens, num_tokens):
    """val and train as prepare.py's docstring defines them, by a plain loop over the documents."""
    ids = [enc.encode_ordinary(d) + [EOT] for d in docs]
    val, train, i = [], [], 0
    while i < len(ids) and len(val) < val_tokens:
        val, i = val + ids[i], i + 1
    while i < len(ids) and len(train) < num_tokens:
        train, i = train + ids[i], i + 1
    return val, train


def bins(out):
    return [np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16).tolist() for s in ("val", "train")]


@pytest.fixture
def prepare(env, monkeypatch):
    """main() of data/fineweb/prepare.py in this process, with one process (--num_proc 1), offline."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
    monkeypatch.setenv("USE_TORCH", os.environ.get("USE_TORCH", "AUTO"))  # prepare.py sets it for itself only
    spec = importlib.util.spec_from_file_location("_fineweb_prepare_t", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda *argv: module.main([*map(str, argv), "--num_proc", "1"])


def run(*args, env, extra_env=None):
    return subprocess.run([sys.executable, PREPARE, *map(str, args)], env={**env, **(extra_env or {})},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- the tokens, exactly

@pytest.mark.parametrize("kind,num_tokens", [("parquet", N), ("jsonl", 10**6)])
def test_the_bins_hold_the_documents_gpt2_tokens_exactly(prepare, shards, enc, tmp_path, capsys, kind,
                                                         num_tokens):
    """parquet: a budget that stops inside the shards; jsonl: one larger than them, which reads them all."""
    prepare("--folder", getattr(shards, kind), "--out_dir", tmp_path, "--val_tokens", V,
            "--num_tokens", num_tokens, "--chunk_docs", 16)
    val, train = expected(shards.docs, enc, V, num_tokens)
    assert bins(tmp_path) == [val, train]
    assert V <= len(val) < V + 1000 and (num_tokens <= len(train) < num_tokens + 1000 or num_tokens == 10**6)
    out = capsys.readouterr().out
    assert f"val.bin has {len(val):,} tokens" in out and f"train.bin has {len(train):,} tokens" in out
    assert ("the source ran out" in out) == (num_tokens == 10**6)
    assert sorted(os.listdir(tmp_path)) == ["prepare_state.json", "train.bin", "val.bin"]


def test_a_larger_budget_extends_train_to_the_bytes_of_preparing_it_at_once(prepare, shards, enc, tmp_path,
                                                                           capsys):
    args = ["--folder", shards.parquet, "--out_dir", tmp_path, "--val_tokens", V, "--chunk_docs", 16]
    prepare(*args, "--num_tokens", N // 3)
    assert bins(tmp_path) == list(expected(shards.docs, enc, V, N // 3))
    prepare(*args, "--num_tokens", N)  # resumes inside a chunk: the saved position skips documents
    assert "resuming" in capsys.readouterr().out
    assert bins(tmp_path) == list(expected(shards.docs, enc, V, N))
    prepare(*args, "--num_tokens", N // 2)  # no smaller: it has more than that already
    assert "prepared already" in capsys.readouterr().out
    assert bins(tmp_path) == list(expected(shards.docs, enc, V, N))
    # a run that stopped after reopening train.bin to extend it, or before renaming it, with ids past its save
    os.rename(tmp_path / "train.bin", tmp_path / "train.bin.partial")
    with open(tmp_path / "train.bin.partial", "ab") as f:
        f.write(b"\xff\xff" * 10)
    prepare(*args, "--num_tokens", N)
    assert "prepared already" in capsys.readouterr().out
    assert bins(tmp_path) == list(expected(shards.docs, enc, V, N))


@pytest.mark.parametrize("corpus,hub", [(None, "HuggingFaceFW/fineweb-edu"),
                                        ("fineweb", "HuggingFaceFW/fineweb")])
def test_the_hub_path_streams_the_10bt_samples_text(prepare, shards, enc, tmp_path, monkeypatch, corpus, hub):
    """Without --files/--folder, load_dataset streams the sample's 'text' column (given here by the parquet
    shards); offline, its failure is one line."""
    import datasets
    real, calls = datasets.load_dataset, []

    def load_dataset(path, **kw):
        calls.append((path, kw))
        files = sorted(os.path.join(shards.parquet, f) for f in os.listdir(shards.parquet))
        return real("parquet", data_files=files, split=kw["split"], streaming=kw["streaming"],
                    columns=kw["columns"])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    corpus_args = ["--corpus", corpus] if corpus else []
    prepare(*corpus_args, "--out_dir", tmp_path, "--val_tokens", V, "--num_tokens", N, "--chunk_docs", 64)
    assert calls == [(hub, {"name": "sample-10BT", "split": "train", "streaming": True, "columns": ["text"]})]
    assert bins(tmp_path) == list(expected(shards.docs, enc, V, N))


def test_offline_the_hub_is_one_error_line(prepare, tmp_path, monkeypatch, capsys):
    import datasets

    def offline(path, **kw):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        prepare("--out_dir", tmp_path, "--num_tokens", N)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "HuggingFaceFW/fineweb-edu (sample-10BT)" in err[0]
    assert "offline, use --files or --folder" in err[0]
    assert [f for f in os.listdir(tmp_path) if "bin" in f] == []


# ----------------------------------------------------------------------------- interruptions

@pytest.mark.slow
def test_a_killed_preparation_resumes_to_the_same_bytes(env, shards, enc, tmp_path, prepare):
    """kill -9 once the 4th chunk's ids are written, before the save that counts them (2 tokenising
    processes): no file train.py would read is left, and the same command resumes from the 3rd chunk's
    save. The resumed run stops one document later, so ids written after that save must go."""
    from configurator import check_dataset

    out = str(tmp_path / "fineweb")
    args = ["--folder", shards.parquet, "--out_dir", out, "--val_tokens", V, "--num_proc", 2,
            "--chunk_docs", 16, "--save_every", 0]
    r = run(*args, "--num_tokens", N, env=env, extra_env={"NANOMOE_DEBUG_PREPARE_KILL_AT_CHUNK": "4"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["prepare_state.json", "train.bin.partial", "val.bin.partial"]
    with open(os.path.join(out, "prepare_state.json")) as f:
        saved = json.load(f)["tokens"]
    assert 0 < 2 * saved["train"] < os.path.getsize(os.path.join(out, "train.bin.partial"))
    with pytest.raises(SystemExit):
        check_dataset(out, out, 32)  # train.py: not prepared
    r = run(*args, "--num_tokens", saved["train"] + 1, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming: val {saved['val']:,} and train {saved['train']:,} tokens" in r.stdout
    assert bins(out) == list(expected(shards.docs, enc, V, saved["train"] + 1))
    prepare(*args, "--num_tokens", N)  # (in this process: --num_proc 1)
    assert bins(out) == list(expected(shards.docs, enc, V, N))
    assert sorted(os.listdir(out)) == ["prepare_state.json", "train.bin", "val.bin"]


# ----------------------------------------------------------------------------- bad input: one line, no work

def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("args,msg", [
    (["--num_tokens", "1e15"], "the budget needs 2,000,000.0 GB more in"),
    (["--num_tokens", "lots"], "--num_tokens='lots': give a token count"),
    (["--val_tokens", "0"], "--val_tokens='0' must be at least 1 and below 1e16"),
    (["--files", "does/not/exist.parquet"], "input file not found: does/not/exist.parquet"),
    (["--files", PREPARE], "not a .parquet, .jsonl or .json file"),
])
def test_bad_input_is_one_error_line(env, shards, tmp_path, args, msg):
    out = tmp_path / "out"
    line = one_error_line(run("--folder", shards.jsonl, *args, "--out_dir", out, env=env))
    assert msg in line
    assert not os.path.exists(out) or os.listdir(out) == []


def test_a_folder_of_another_preparation_is_refused(env, shards, tmp_path):
    """bins it did not write, a preparation of other shards or another val budget, a folder in use: one
    line each, and the files stay as they are."""
    import fcntl

    (tmp_path / "train.bin").write_bytes(b"\0\0" * 100)
    (tmp_path / "val.bin").write_bytes(b"\0\0" * 100)
    args = ["--folder", shards.jsonl, "--out_dir", tmp_path, "--val_tokens", V]
    line = one_error_line(run(*args, env=env))
    assert "holds train.bin/val.bin that no prepare_state.json describes" in line
    state = {"source": {"files": [["other.parquet", 1]]}, "val_tokens": V, "tokens": {"val": 1, "train": 1}}
    (tmp_path / "prepare_state.json").write_text(json.dumps(state))
    assert "holds a preparation of 1 local file(s): other.parquet" in one_error_line(run(*args, env=env))
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another prepare.py is writing to" in one_error_line(run(*args, env=env))
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["prepare_state.json", "train.bin", "val.bin"]
    assert (tmp_path / "train.bin").read_bytes() == b"\0\0" * 100


def test_restart_replaces_another_preparation(prepare, shards, enc, tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\0\0" * 100)
    prepare("--folder", shards.jsonl, "--out_dir", tmp_path, "--val_tokens", V, "--num_tokens", N,
            "--restart")
    assert bins(tmp_path) == list(expected(shards.docs, enc, V, N))


# ----------------------------------------------------------------------------- the configs

CONFIGS = ("train_fineweb_dense", "train_fineweb_moe", "train_fineweb_moe_1gpu")


def test_the_fineweb_configs_are_gpt2_small_twins_of_equal_active_flops(monkeypatch):
    """Each config file executed as configurator.configure does (in a namespace of its own), its model
    built at full size on the meta device."""
    import torch
    from moe_model import MODEL_KEYS, build_model

    monkeypatch.chdir(ROOT)  # the files exec one another by relative path, as train.py runs them
    cfg, params = {}, {}
    for name in CONFIGS:
        ns = {}
        exec(open(f"config/{name}.py").read(), ns)
        cfg[name] = ns
        with torch.device("meta"):
            model = build_model({k: ns[k] for k in MODEL_KEYS if k in ns} | {"vocab_size": 50304})
        params[name] = (model.get_num_params(), model.get_num_params(active=True))
        assert (ns["n_layer"], ns["n_head"], ns["n_embd"], ns["block_size"]) == (12, 12, 768, 1024)
        block = ("norm", "rope", "mlp", "qk_norm", "bias", "tie_embeddings")
        assert [getattr(model.config, k) for k in block] == ["rmsnorm", True, "swiglu", "full", False, True]
        # the last step is an eval with HellaSwag, and the schedule ends there
        assert ns["max_iters"] % ns["hellaswag_interval"] == 0
        assert ns["hellaswag_interval"] % ns["eval_interval"] == 0
        assert ns["lr_decay_iters"] == ns["max_iters"] and ns["dataset"] == "fineweb"
    dense, moe = params["train_fineweb_dense"], params["train_fineweb_moe"]
    assert 123e6 < dense[0] == dense[1] < 125e6  # GPT-2 small's 124M
    assert moe[1] - dense[1] == 12 * 768 * 16  # the same active parameters, but for the routers
    assert 290e6 < moe[0] < 300e6
    assert params["train_fineweb_moe_1gpu"] == moe
    tokens = {n: c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"] for n, c in cfg.items()}
    assert tokens == dict(zip(CONFIGS, (524_288, 524_288, 262_144)))
    assert cfg["train_fineweb_moe_1gpu"]["max_iters"] * 262_144 <= 1e9  # inside --num_tokens=1B


@pytest.mark.slow
def test_the_fineweb_configs_pass_train_py(prepare, shards, tmp_path):
    """train.py takes every key of the three files (the 1-GPU one executes the other two) and trains a step
    on data prepare.py wrote, the model shrunk to a CPU's size (the full size: the test above)."""
    data = tmp_path / "fineweb"
    prepare("--folder", shards.parquet, "--out_dir", data, "--val_tokens", V, "--num_tokens", N)
    tiny = ["--n_layer=1", "--n_embd=64", "--n_head=2", "--mlp_hidden=128", "--expert_hidden=32",
            "--block_size=32", "--batch_size=2", "--max_iters=1", "--eval_iters=1", "--hellaswag_interval=0",
            "--device=cpu", "--compile=False", "--dtype=float32"]
    p = run_script("train.py", "config/train_fineweb_moe_1gpu.py", *tiny, f"--dataset={data}",
                   f"--out_dir={tmp_path / 'out'}")
    assert "step 1: train loss" in p.stdout
