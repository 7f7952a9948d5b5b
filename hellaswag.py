"""
HellaSwag accuracy of a GPT-2-BPE model (or of a Hugging Face folder's, with its own tokenizer: tokenizer),
scored completion-style as llm.c's dev/data/hellaswag.py does (tools/eval_hellaswag.py is the command line;
train.py calls prepare at start and metrics at its evals, hellaswag_interval). An example is a context and 4
endings. Each ending is scored by the model's cross-entropy on its own tokens, each predicted from the context
and the ending's tokens before it: acc picks the ending with the lowest sum, acc_norm the lowest mean per
token. llm.c measured acc 0.2859, acc_norm 0.2955 for gpt2 (124M) and 0.3842, 0.4893 for gpt2-xl; chance is
0.25. The validation file is downloaded once into data/hellaswag/. Rows longer than the model's block_size
lose the start of their context (crop); an example whose ending itself does not fit is skipped, and the count
says how many were scored.
"""
import os
import sys
import glob
import json
import urllib.request
from contextlib import nullcontext

import torch
from torch.nn import functional as F

URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, 'data', 'hellaswag')
GPT2_VOCAB = 50257  # GPT-2's BPE (nanoGPT pads a model's vocab_size to 50304)

class HellaSwagError(Exception):
    """Bad input (no data file, a model that does not read GPT-2 BPE): one line, for fail()."""


def one_line(e):
    return ' '.join(str(e).split()) or type(e).__name__


def download(url, path, timeout=30):
    """url -> path atomically: a temp file in the same folder, then os.replace, so that a failed or killed
    download never leaves half a file that a later run would read as the data."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, 'wb') as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch(data_dir=''):
    """The path of hellaswag_val.jsonl in data_dir ('' = data/hellaswag), downloaded there on first use."""
    data_dir = data_dir or DATA_DIR
    path = os.path.join(data_dir, os.path.basename(URL))
    for tmp in glob.glob(glob.escape(path) + '.*.tmp'):  # a download killed midway (kill -9) left it
        try:
            os.kill(int(tmp.split('.')[-2]), 0)  # a live download's: left alone
        except ProcessLookupError:
            os.remove(tmp)
        except (ValueError, PermissionError):
            pass
    if os.path.isfile(path):
        return path
    print(f"downloading {URL} to {path}")
    try:
        os.makedirs(data_dir, exist_ok=True)
        download(URL, path)
    except Exception as e:  # offline: URLError, a timeout, a refused connection, an unwritable folder, ...
        raise HellaSwagError(f"HellaSwag data {path} is missing and its download from {URL} failed "
                             f"({one_line(e)}); offline, download that file elsewhere and place it at "
                             f"{path}") from None
    return path


def load_examples(path, max_examples=0):
    """The first max_examples (0: all) examples of a HellaSwag .jsonl file, each checked for what
    render_example reads: ctx (a string), endings (4 strings) and label (0-3)."""
    examples = []
    try:
        with open(path, encoding='utf-8') as f:
            for i, line in enumerate(f, 1):
                if max_examples and len(examples) == max_examples:
                    break
                try:
                    ex = json.loads(line)
                    ok = (isinstance(ex['ctx'], str) and isinstance(ex['endings'], list)
                          and len(ex['endings']) == 4
                          and all(isinstance(e, str) for e in ex['endings']) and ex['label'] in (0, 1, 2, 3))
                except (ValueError, TypeError, KeyError):
                    ok = False
                if not ok:
                    raise HellaSwagError(f"{path} line {i} is not a HellaSwag example (JSON with ctx, "
                                         f"4 endings and a label 0-3); delete the file to download it again")
                examples.append(ex)
    except (OSError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"{path} cannot be read ({one_line(e)})") from None
    if not examples:
        raise HellaSwagError(f"{path} holds no examples; delete it to download it again")
    return examples


def render_example(example, enc):
    """tokens [4, T]: row i is the context then ' ' + ending i (GPT-2's BPE keeps a word's leading space in
    its token), right-padded with 0; mask [4, T]: 1 on the ending's tokens; and the label (the right
    ending)."""
    ctx = enc.encode_ordinary(example['ctx'])
    # (a folder's own tokenizer: each ending as it follows the context, hf.FolderTokenizer.continuation)
    ending = enc.encode_ordinary if not hasattr(enc, 'continuation') else (
        lambda text: enc.continuation(example['ctx'], text))
    rows = [ctx + ending(' ' + e) for e in example['endings']]
    tokens = torch.zeros(4, max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx):len(row)] = 1
    return tokens, mask, example['label']


def crop(tokens, mask, block_size):
    """(tokens, mask) cut to block_size columns by dropping the first ones. The rows share the context, so
    every ending keeps the same end of it. None if an ending would lose the context token that predicts its
    first token (or the context is empty): that example cannot be scored in block_size."""
    cut = max(0, tokens.size(1) - block_size)
    if mask[:, :cut + 1].any():
        return None
    return tokens[:, cut:], mask[:, cut:]


def ending_losses(model, tokens, mask):
    """Per row, the sum and the mean of the cross-entropy of the ending's tokens. model.GPT returns the logits
    of every position only when given targets (else of the last one): the targets are the next tokens on the
    ending, -1 (ignored by the model's loss, which is not used) elsewhere."""
    # position t predicts t+1
    targets = F.pad(torch.where(mask[:, 1:].bool(), tokens[:, 1:], -1), (0, 1), value=-1)
    logits, _ = model(tokens, targets)
    losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                             reduction='none').view(targets.shape)  # 0 off the endings
    total = losses.sum(1)
    return total, total / mask[:, 1:].sum(1)


@torch.no_grad()
def score(model, examples, device, ctx=nullcontext(), verbose=False, stop=lambda: False):
    """(acc, acc_norm, n) of model on rendered examples (render_example), in eval mode (the model's mode is
    restored after). n counts the examples that fit in model.config.block_size (crop); with none, NaNs.
    stop() is asked before each example (train.py: a stop signal came): True ends the scoring, and then
    score returns None."""
    training = model.training
    model.eval()
    correct = correct_norm = n = 0
    for i, (tokens, mask, label) in enumerate(examples):
        if stop():
            print(f"hellaswag: stopped after {i} of {len(examples)} examples (a stop signal); not scored")
            model.train(training)
            return None
        if (cropped := crop(tokens, mask, model.config.block_size)) is None:
            continue
        with ctx:
            total, mean = ending_losses(model, *(t.to(device) for t in cropped))
        n += 1
        correct += int(total.argmin()) == label
        correct_norm += int(mean.argmin()) == label
        if verbose and n % 1000 == 0:
            print(f"{n} examples: acc {correct / n:.4f}, acc_norm {correct_norm / n:.4f}")
    model.train(training)
    return (correct / n, correct_norm / n, n) if n else (float('nan'), float('nan'), 0)


def metrics(model, examples, device, ctx=nullcontext(), stop=lambda: False):
    """score as train.py logs it (nothing if stopped)."""
    if (result := score(model, examples, device, ctx, stop=stop)) is None:
        return {}
    return {'hellaswag/acc': result[0], 'hellaswag/acc_norm': result[1]}


def tokenizer(vocab_size, meta_path=None, folder=None):
    """How the model reads text: a Hugging Face folder's as hf.folder_tokenizer says (its own tokenizer, or
    GPT-2's BPE), else None: GPT-2's BPE, loaded by prepare. HellaSwagError where that cannot be: a dataset
    with a meta.pkl has its own vocabulary (a character-level one), and so has a model with fewer than
    GPT-2's 50257 tokens and no tokenizer files."""
    if meta_path and os.path.exists(meta_path):
        raise HellaSwagError("HellaSwag needs a GPT-2 BPE model, but the dataset has its own vocabulary "
                             f"({meta_path}): a character-level model cannot read GPT-2 tokens")
    if folder is not None:
        from hf import folder_tokenizer
        try:
            return folder_tokenizer(folder, vocab_size)
        except ValueError as e:
            raise HellaSwagError(str(e)) from None
    if vocab_size < GPT2_VOCAB:
        raise HellaSwagError(f"HellaSwag needs a GPT-2 BPE model (vocab_size >= {GPT2_VOCAB}), "
                             f"but this one has vocab_size={vocab_size} (a character-level model?)")


def prepare(data_dir='', max_examples=0, block_size=None, vocab_size=GPT2_VOCAB, meta_path=None,
            folder=None):
    """The first max_examples (0: all) validation examples, rendered for score; the file is downloaded if need
    be. folder: the Hugging Face folder the model comes from, encoded as hf.folder_tokenizer says (its own
    tokenizer, or GPT-2's BPE); else GPT-2's BPE. HellaSwagError, one line, for a model that is not GPT-2 BPE
    and has no tokenizer (checked first, before any download), without the file or GPT-2's BPE, or if no
    example fits block_size."""
    enc = tokenizer(vocab_size, meta_path, folder)
    path = fetch(data_dir)
    examples = load_examples(path, max_examples)
    if enc is None:
        from data.tiktoken_offline import get_gpt2_encoding  # tiktoken 'gpt2', seeded offline if need be
        try:
            enc = get_gpt2_encoding(verbose=False)
        except Exception as e:
            raise HellaSwagError(one_line(e)) from None
    rendered = [render_example(ex, enc) for ex in examples]
    too_long = sum(crop(tokens, mask, block_size) is None
                   for tokens, mask, _ in rendered) if block_size else 0
    if too_long == len(rendered):
        raise HellaSwagError(f"no HellaSwag example fits block_size={block_size} "
                             "(an ending and a context token)")
    print(f"hellaswag: {len(rendered)} examples from {path}" +
          (f", {too_long} of them skipped (an ending longer than block_size={block_size})" if too_long
           else ''))
    return rendered
