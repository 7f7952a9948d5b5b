"""hellaswag.py: rendering against tiktoken, scoring with a model whose losses are known by hand, the data
file (download, offline), the command line in-process, and train.py's hellaswag_interval end to end."""
import io
import json
import math
import os
import runpy
import sys
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from conftest import ROOT, run, read_log, tiny_tokenizer
import hellaswag
from data.tiktoken_offline import get_gpt2_encoding
from model import GPT, GPTConfig

V = 50304  # nanoGPT's padded GPT-2 vocab_size
C = 10.0  # the hand-made model's logit for the token it predicts
M = math.log(V - 1 + math.exp(C))  # its loss on any other token (every position has one logit C, the rest 0)
H = M - C  # its loss on the token it predicts

# HellaSwag's format (rowanz/hellaswag, data/hellaswag_val.jsonl); render_example reads ctx, endings and label
EXAMPLES = [
    # the bigram model below knows " cooks an egg" after " cooks" (1 miss, 2 hits): the lowest mean, not the
    # lowest sum (" dances" is 1 miss): acc_norm right, acc wrong
    {'ind': 0, 'activity_label': 'Cooking', 'ctx_a': 'A woman is in a kitchen.', 'ctx_b': 'she',
     'ctx': 'A woman is in a kitchen. she', 'split': 'val', 'split_type': 'indomain', 'label': 1,
     'endings': ['dances', 'cooks an egg', 'eats an apple', 'sings a song'], 'source_id': 'test~0'},
    # it knows " It eats." after "." entirely: both right
    {'ind': 1, 'activity_label': 'Dogs', 'ctx_a': 'The dog barks.', 'ctx_b': '', 'ctx': 'The dog barks.',
     'split': 'val', 'split_type': 'zeroshot', 'label': 2,
     'endings': ['It runs.', 'It sleeps.', 'It eats.', 'It jumps high.'], 'source_id': 'test~1'},
    # it knows " falls" after " he": both pick ending 0, both wrong
    {'ind': 2, 'activity_label': 'Roof shingle removal', 'ctx_a': 'A man is sitting on a roof.',
     'ctx_b': 'he', 'ctx': 'A man is sitting on a roof. he', 'split': 'val', 'split_type': 'indomain',
     'label': 3, 'endings': ['falls', 'jumps down', 'sits down', 'runs away'], 'source_id': 'test~2'},
]


@pytest.fixture(scope='module')
def enc():
    return get_gpt2_encoding(verbose=False)


@pytest.fixture
def data_dir(tmp_path):
    """A folder holding EXAMPLES as hellaswag_val.jsonl, as fetch caches it."""
    (tmp_path / 'hellaswag_val.jsonl').write_text(''.join(json.dumps(ex) + '\n' for ex in EXAMPLES))
    return str(tmp_path)


class Bigram(torch.nn.Module):
    """Logit C for succ[x] after token x (after any other token for the sink V-1, never a GPT-2 token), 0
    elsewhere: a token costs H where predicted, M anywhere else. Like model.GPT, it returns the last
    position's logits only when given no targets."""

    def __init__(self, pairs, block_size=64):
        super().__init__()
        self.config = types.SimpleNamespace(block_size=block_size, vocab_size=V)
        self.succ = torch.full((V,), V - 1)
        for x, y in pairs:
            assert self.succ[x] in (V - 1, y)  # one successor per token
            self.succ[x] = y
        self.modes = []

    def forward(self, idx, targets=None):
        self.modes.append(self.training)
        logits = torch.zeros(*idx.shape, V).scatter_(-1, self.succ[idx].unsqueeze(-1), C)
        return (logits, None) if targets is not None else (logits[:, [-1]], None)


def bigram(enc, block_size=64):
    toks = enc.encode_ordinary
    egg, eats = toks(' cooks an egg'), toks(' It eats.')
    assert [len(toks(' ' + e)) for e in EXAMPLES[0]['endings']] == [1, 3, 3, 3]  # what the sums below assume
    pairs = [(egg[0], egg[1]), (egg[1], egg[2]), (toks(EXAMPLES[1]['ctx'])[-1], eats[0]), (eats[0], eats[1]),
             (eats[1], eats[2]), (toks(EXAMPLES[2]['ctx'])[-1], toks(' falls')[0])]
    return Bigram(pairs, block_size)


def test_render_example_matches_tiktoken(enc):
    for ex in EXAMPLES:
        tokens, mask, label = hellaswag.render_example(ex, enc)
        ctx = enc.encode(ex['ctx'])
        ends = [enc.encode(' ' + e) for e in ex['endings']]  # the space: GPT-2 BPE words carry theirs
        assert label == ex['label'] and tokens.shape == mask.shape == (4, len(ctx) + max(map(len, ends)))
        for i, end in enumerate(ends):
            pad = [0] * (tokens.size(1) - len(ctx) - len(end))
            assert tokens[i].tolist() == ctx + end + pad
            assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + pad


def test_losses_sum_and_mean_as_computed_by_hand(enc):
    model = bigram(enc)
    tokens, mask, _ = hellaswag.render_example(EXAMPLES[0], enc)
    total, mean = hellaswag.ending_losses(model, tokens, mask)
    close = dict(rtol=1e-5, atol=1e-4)  # (the model computes in float32)
    torch.testing.assert_close(total, torch.tensor([M, M + 2 * H, 3 * M, 3 * M]), **close)
    torch.testing.assert_close(mean, torch.tensor([M, (M + 2 * H) / 3, M, M]), **close)
    assert total.argmin() == 0 and mean.argmin() == 1  # sum and mean disagree here
    tokens, mask, _ = hellaswag.render_example(EXAMPLES[1], enc)
    total, mean = hellaswag.ending_losses(model, tokens, mask)
    torch.testing.assert_close(total, torch.tensor([H + 2 * M, H + 2 * M, 3 * H, H + 3 * M]), **close)


def test_score_acc_is_the_lowest_sum_and_acc_norm_the_lowest_mean(enc):
    model = bigram(enc)
    examples = [hellaswag.render_example(ex, enc) for ex in EXAMPLES]
    assert hellaswag.score(model, examples, 'cpu') == (1 / 3, 2 / 3, 3)
    assert model.modes and not any(model.modes) and model.training  # scored in eval mode, then restored
    assert hellaswag.metrics(model, examples, 'cpu') == {'hellaswag/acc': 1 / 3, 'hellaswag/acc_norm': 2 / 3}


def test_score_stops_between_examples_when_asked(enc):
    """train.py asks whether a stop signal came (it used to save only after the whole eval, 15 s later)."""
    model = bigram(enc)
    examples = [hellaswag.render_example(ex, enc) for ex in EXAMPLES]
    asked = []
    assert hellaswag.score(model, examples, 'cpu', stop=lambda: asked.append(1) or len(asked) > 1) is None
    assert len(asked) == 2 and model.modes == [False] and model.training  # one example, mode restored
    assert hellaswag.metrics(model, examples, 'cpu', stop=lambda: True) == {}  # nothing to log


def test_rows_longer_than_block_size_lose_the_start_of_the_context(enc, data_dir):
    tokens, mask, _ = hellaswag.render_example(EXAMPLES[0], enc)  # 8 context tokens, endings of 1 or 3
    cropped, cmask = hellaswag.crop(tokens, mask, 4)
    # the last context token stays
    assert torch.equal(cropped, tokens[:, -4:]) and torch.equal(cmask, mask[:, -4:])
    assert hellaswag.crop(tokens, mask, 3) is None  # " cooks" would lose the token that predicts it
    assert torch.equal(hellaswag.crop(tokens, mask, 64)[0], tokens)
    examples = [hellaswag.render_example(ex, enc) for ex in EXAMPLES]
    # the bigram model reads one token back: a crop that keeps
    # it scores the same; example 1 (4-token endings) is skipped
    assert hellaswag.score(bigram(enc, block_size=5), examples, 'cpu') == (1 / 3, 2 / 3, 3)
    assert hellaswag.score(bigram(enc, block_size=4), examples, 'cpu') == (0.0, 0.5, 2)
    with pytest.raises(hellaswag.HellaSwagError, match='no HellaSwag example fits block_size=2'):
        hellaswag.prepare(data_dir, 0, 2)


def test_a_gpt_scores_padded_rows_as_it_scores_each_row_alone(enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=V, dropout=0.0)).eval()
    tokens, mask, _ = hellaswag.render_example(EXAMPLES[0], enc)
    with torch.no_grad():
        total, mean = hellaswag.ending_losses(model, tokens, mask)
        for i in range(4):
            n = int(mask[i].nonzero().max()) + 1  # the row without its padding
            row, start = tokens[i:i + 1, :n], int(mask[i].nonzero().min())
            logp = torch.log_softmax(model(row, row)[0][0, :-1], -1).gather(1, row[0, 1:, None])[:, 0]
            torch.testing.assert_close(total[i], -logp[start - 1:].sum())
            torch.testing.assert_close(mean[i], -logp[start - 1:].mean())


def test_load_examples_takes_the_first_n_and_names_a_bad_line(data_dir):
    path = os.path.join(data_dir, 'hellaswag_val.jsonl')
    assert hellaswag.load_examples(path) == EXAMPLES
    assert hellaswag.load_examples(path, 2) == EXAMPLES[:2]
    with open(path, 'a') as f:
        f.write(json.dumps({**EXAMPLES[0], 'endings': ['only', 'three', 'endings']}) + '\n')
    with pytest.raises(hellaswag.HellaSwagError, match='line 4 is not a HellaSwag example'):
        hellaswag.load_examples(path)


def test_a_model_that_is_not_gpt2_bpe_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: pytest.fail('downloaded'))
    with pytest.raises(hellaswag.HellaSwagError, match=r'vocab_size=65 \(a character-level model\?\)'):
        hellaswag.prepare(str(tmp_path), vocab_size=65)
    (tmp_path / 'meta.pkl').write_bytes(b'')  # a dataset with its own vocabulary, as shakespeare_char's
    with pytest.raises(hellaswag.HellaSwagError, match='the dataset has its own vocabulary'):
        hellaswag.prepare(str(tmp_path), meta_path=str(tmp_path / 'meta.pkl'))


def tiny_folder(folder):
    """A tiny Llama folder of 65 tokens, with its own word-level tokenizer (conftest.tiny_tokenizer)."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=65, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return tiny_tokenizer(folder)


def test_a_folder_is_encoded_with_its_own_tokenizer(tmp_path, data_dir, monkeypatch, capsys):
    """Once GPT-2's BPE whatever the folder: a 65-token model was refused, a Llama's would read wrong ids."""
    tokenizer = tiny_folder(tmp_path / 'hf')
    rendered = hellaswag.prepare(data_dir, vocab_size=65, folder=str(tmp_path / 'hf'))
    ex = {**EXAMPLES[0], 'ctx': 'the cat', 'endings': ['sat', 'w3 w4', 'cat the', 'dog']}
    tokens, mask, _ = hellaswag.render_example(ex, hellaswag.tokenizer(65, folder=str(tmp_path / 'hf')))
    assert tokens.tolist() == [[1, 2, 3, 0], [1, 2, 7, 8], [1, 2, 2, 1], [1, 2, 0, 0]]  # (dog: [UNK], 0)
    row = tokenizer.encode(EXAMPLES[0]['ctx'] + ' ' + EXAMPLES[0]['endings'][0])  # ([UNK]s, but its own)
    assert rendered[0][0][0, :len(row)].tolist() == row and rendered[0][1][0].sum() == 1
    code, out, err = command(monkeypatch, capsys, f'--init_from={tmp_path / "hf"}', f'--data_dir={data_dir}')
    assert code == 0 and out.strip().splitlines()[-1].startswith('hellaswag: 3 examples, acc '), out + err


class Response(io.BytesIO):
    """What urlopen returns, failing after `fail_after` bytes if given (a connection lost mid-download)."""

    def __init__(self, data, fail_after=None):
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError('connection reset by peer')
        return super().read(min(n, self.fail_after - self.tell()) if self.fail_after is not None else n)


def test_the_download_is_atomic_and_cached(tmp_path, monkeypatch):
    data = ''.join(json.dumps(ex) + '\n' for ex in EXAMPLES).encode()
    path = tmp_path / 'hs' / 'hellaswag_val.jsonl'
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout: Response(data, fail_after=100))
    with pytest.raises(hellaswag.HellaSwagError, match='connection reset by peer'):
        hellaswag.fetch(str(tmp_path / 'hs'))
    assert os.listdir(tmp_path / 'hs') == []  # neither half a file nor a temp file
    urls = []
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout: urls.append(url) or Response(data))
    assert hellaswag.fetch(str(tmp_path / 'hs')) == str(path) and path.read_bytes() == data
    assert hellaswag.fetch(str(tmp_path / 'hs')) == str(path) and urls == [hellaswag.URL]  # once


def gpt2_checkpoint(out_dir, vocab_size=V, dataset='owt-like'):
    """out_dir/ckpt.pt of a tiny dense GPT, as train.py writes it (the keys hellaswag.py reads)."""
    torch.manual_seed(0)
    model_args = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=vocab_size,
                      dropout=0.0)
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'model': GPT(GPTConfig(**model_args)).state_dict(), 'model_args': model_args,
                'config': {'dataset': dataset}}, os.path.join(out_dir, 'ckpt.pt'))


def command(monkeypatch, capsys, *args):
    """python tools/eval_hellaswag.py *args, in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, 'argv', ['tools/eval_hellaswag.py', '--device=cpu', '--dtype=float32', *args])
    code = 0
    try:
        runpy.run_path(os.path.join(ROOT, 'tools/eval_hellaswag.py'), run_name='__main__')
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_command_scores_a_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    gpt2_checkpoint(str(tmp_path / 'out'))
    code, out, err = command(monkeypatch, capsys, f'--out_dir={tmp_path / "out"}', f'--data_dir={data_dir}',
                             '--max_examples=2')
    last = out.strip().splitlines()[-1]
    assert code == 0 and last.startswith('hellaswag: 2 examples, acc ') and 'acc_norm' in last, out + err


def test_command_offline_without_the_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    def offline(url, timeout):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    gpt2_checkpoint(str(tmp_path / 'out'))
    empty = tmp_path / 'empty'
    code, out, err = command(monkeypatch, capsys, f'--out_dir={tmp_path / "out"}', f'--data_dir={empty}')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: HellaSwag data '), err
    assert str(empty / 'hellaswag_val.jsonl') in lines[0] and hellaswag.URL in lines[0] \
        and 'place' in lines[0]
    assert os.listdir(empty) == []


def test_command_refuses_a_character_level_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    # shakespeare_char's vocab_size
    gpt2_checkpoint(str(tmp_path / 'out'), vocab_size=65, dataset='tiny_char')
    code, out, err = command(monkeypatch, capsys, f'--out_dir={tmp_path / "out"}', f'--data_dir={data_dir}')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'needs a GPT-2 BPE model' in lines[0] \
        and 'vocab_size=65' in lines[0], err


@pytest.mark.slow
def test_train_logs_hellaswag_at_its_interval_and_plot_draws_it(tmp_path, data_dir, monkeypatch, capsys):
    """train.py on a tiny GPT-2-BPE dataset (uint16 ids, no meta.pkl), a tiny MoE, 2 examples at every other
    eval."""
    dataset = tmp_path / 'bpe'
    dataset.mkdir()
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        rng.integers(0, 50257, 2000, dtype=np.uint16).tofile(dataset / f'{split}.bin')
    out = tmp_path / 'out'
    p = run('train.py', f'--dataset={dataset}', f'--out_dir={out}', '--n_layer=1', '--n_head=2',
            '--n_embd=16', '--block_size=64', '--n_expert=2', '--top_k=1', '--expert_hidden=16',
            '--batch_size=2', '--eval_iters=1', '--gradient_accumulation_steps=1', '--device=cpu',
            '--dtype=float32', '--compile=False', '--max_iters=2', '--eval_interval=1', '--warmup_iters=0',
            '--hellaswag_interval=2', '--hellaswag_examples=2', f'--hellaswag_dir={data_dir}')
    assert f"hellaswag: 2 examples from {data_dir}" in p.stdout
    evals = [r for r in read_log(str(out)) if 'val/ce' in r]
    assert [r['iter'] for r in evals] == [0, 1, 2]
    assert [('hellaswag/acc_norm' in r, 'hellaswag/acc' in r)
            for r in evals] == [(True, True), (False, False),
                                                                                   (True, True)]
    assert all(r['hellaswag/acc_norm'] in (0, 0.5, 1) for r in evals[::2])  # 2 examples
    assert 'hellaswag/acc_norm' in p.stdout.split('step 2: ')[1].splitlines()[0]  # printed with the eval
    monkeypatch.setattr(sys, 'argv', ['tools/plot.py', f'--out_dir={out}'])
    runpy.run_path(os.path.join(ROOT, 'tools/plot.py'), run_name='__main__')
    assert (out / 'hellaswag.png').stat().st_size > 0


@pytest.mark.slow
def test_a_sigterm_during_the_hellaswag_eval_stops_it(tmp_path):
    """3,000 examples (tens of seconds): the run stops within one, saves and exits."""
    import signal
    import subprocess
    import time
    dataset, hs = tmp_path / 'bpe', tmp_path / 'hs'
    dataset.mkdir()
    hs.mkdir()
    (hs / 'hellaswag_val.jsonl').write_text(''.join(json.dumps(ex) + '\n' for ex in EXAMPLES * 1000))
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        rng.integers(0, 50257, 2000, dtype=np.uint16).tofile(dataset / f'{split}.bin')
    out = tmp_path / 'out'
    args = [f'--dataset={dataset}', f'--out_dir={out}', '--n_layer=1', '--n_head=2', '--n_embd=16',
            '--block_size=64', '--n_expert=0', '--batch_size=2', '--eval_iters=1',
            '--gradient_accumulation_steps=1', '--device=cpu', '--dtype=float32', '--compile=False',
            '--max_iters=100', '--eval_interval=50', '--hellaswag_interval=50', '--hellaswag_examples=0',
            f'--hellaswag_dir={hs}']
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT, text=True,
                         env={**os.environ, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith('number of parameters'):  # the first eval comes next
            break
    time.sleep(2)  # into that eval (~20 s): a signal during start-up stops the run before it
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert 'hellaswag: stopped after ' in stdout and 'of 3000 examples (a stop signal); not scored' in stdout
    assert 'received SIGTERM: saved checkpoint at iter 1' in stdout
    assert not any('hellaswag/acc' in r for r in read_log(str(out)))


def test_a_sentencepiece_folder_scores_each_ending_as_it_follows_the_context():
    """A Llama-2/Mixtral-style tokenizer encodes ' sat' alone as a lone space token and 'sat', but
    'the cat sat' without it: the ending is scored on the tokens that follow its context."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from hf import FolderTokenizer
    words = ['<unk>', '\u2581', '\u2581the', '\u2581cat', '\u2581sat']
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend('\u2581'), normalizers.Replace(' ', '\u2581')])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme='never', split=True)
    enc = FolderTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>'))
    assert enc.encode_ordinary(' sat') == [1, 4]  # (the tokenizer this guards against)
    example = {'ctx': 'the cat', 'endings': ['sat', 'cat', 'the', 'sat'], 'label': 2}
    tokens, mask, label = hellaswag.render_example(example, enc)
    assert tokens[:, :2].tolist() == [[2, 3]] * 4 and label == 2
    assert [row[m.bool()].tolist() for row, m in zip(tokens, mask)] == [[4], [3], [2], [4]]
