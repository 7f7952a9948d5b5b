import os
import subprocess
import sys

import pytest

# One thread for the test process and every subprocess it starts: tiny models gain nothing from more,
# and OpenMP threads busy-waiting at barriers while another process holds the second core slow a
# 2-core machine down a hundredfold (set before torch is imported)
os.environ['OMP_NUM_THREADS'] = '1'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a model small enough to train a few dozen steps in seconds on 2 CPU cores
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_iters=2',
        '--device=cpu', '--dtype=float32', '--compile=False', '--n_expert=4', '--top_k=2',
        '--expert_hidden=32', '--expert_impl=grouped', '--dataset=shakespeare_char',
        '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--warmup_iters=5', '--decay_lr=False',
        '--log_interval=1', '--max_iters=10']


def run(script, *args, check=True, timeout=300, env=None):
    """Run one of the repo's scripts with this interpreter (env: variables to set); returns the
    CompletedProcess."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed "
                             f"({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def nan_at(iter_num):
    """The environment that makes train.py's loss NaN at iteration iter_num (its fault injection)."""
    return {'NANOMOE_DEBUG_NAN_AT_ITER': str(iter_num)}


def read_log(out_dir):
    import json
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='session')
def shakespeare_char():
    """The prepared shakespeare_char dataset (prepared once, offline from ../shared/data if need be)."""
    folder = os.path.join(ROOT, 'data', 'shakespeare_char')
    if not all(os.path.exists(os.path.join(folder, f)) for f in ('train.bin', 'val.bin', 'meta.pkl')):
        run('data/shakespeare_char/prepare.py')
    return folder


def tiny_tokenizer(folder, vocab_size=65):
    """A word-level tokenizer of vocab_size words ('the', 'cat', 'sat', w0, w1, ...), saved in folder as
    transformers saves one (tokenizer.json): nothing like GPT-2's BPE, so that ids from the wrong one show."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ['[UNK]', 'the', 'cat', 'sat'] + [f'w{i}' for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]')
    tokenizer.save_pretrained(folder)
    return tokenizer
