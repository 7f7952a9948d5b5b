"""A user coming from nanoGPT: its config files and checkpoints work here, this project's dense checkpoints
work there, GPT-2 weights load from a local folder, and wandb logs (offline)."""
import dataclasses
import glob
import os

import pytest
import torch

from conftest import ROOT, run, read_log
from checkpoint import load_checkpoint
from configurator import configure
from model import GPT, GPTConfig
from configurator import FORK_KEYS
from moe_model import MODEL_KEYS, MoEConfig

TINY_OVERRIDES = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
                  '--eval_iters=2', '--device=cpu', '--compile=False', '--max_iters=4', '--eval_interval=2',
                  '--log_interval=1']

# the keys and values of nanoGPT's config/train_shakespeare_char.py and config/finetune_shakespeare.py
NANOGPT_SHAKESPEARE_CHAR = """
out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially
"""

NANOGPT_FINETUNE_SHAKESPEARE = """
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl' # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
"""


@dataclasses.dataclass
class NanoGPTConfig:  # nanoGPT's model.GPTConfig, field for field
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """A saved GPT2LMHeadModel with shakespeare_char's 65-token vocabulary (save_pretrained's folder)."""
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('tiny-gpt2')
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=65,
                                                         n_positions=64, activation_function='gelu')
                                 ).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_nanogpt_shakespeare_char_config_runs_unchanged(shakespeare_char, tmp_path):
    config = tmp_path / 'train_shakespeare_char.py'
    config.write_text(NANOGPT_SHAKESPEARE_CHAR)
    out = tmp_path / 'out'
    run('train.py', str(config), *TINY_OVERRIDES, '--max_iters=6', '--warmup_iters=0', f'--out_dir={out}')
    evals = [r for r in read_log(str(out)) if 'val/ce' in r]
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    # always_save_checkpoint=False: ckpt.pt is written only at an eval that improved the val loss
    best = min(range(1, len(evals)), key=lambda i: evals[i]['val/ce'])
    assert ckpt['iter_num'] == evals[best]['iter'] and ckpt['config']['always_save_checkpoint'] is False


@pytest.mark.slow
def test_nanogpt_finetune_config_runs_with_a_local_gpt2_folder(shakespeare_char, tiny_gpt2, tmp_path):
    config = tmp_path / 'finetune_shakespeare.py'
    config.write_text(NANOGPT_FINETUNE_SHAKESPEARE)
    out = tmp_path / 'out'
    run('train.py', str(config), *TINY_OVERRIDES, f'--init_from={tiny_gpt2}', '--dataset=shakespeare_char',
        '--gradient_accumulation_steps=2', f'--out_dir={out}', '--backend=gloo')
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['model_args'] == {**dataclasses.asdict(NanoGPTConfig(n_layer=2, n_head=2, n_embd=32,
                                                                     vocab_size=65, block_size=32))}


@pytest.mark.slow
def test_gpt2_offline_is_one_line(shakespeare_char, tmp_path):
    """Offline, a GPT-2 name is one error line at once. (A relative GPT-2 folder: the upcycling test
    below.)"""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}  # what a machine without network meets, at once
    import subprocess
    import sys
    # (train.py: gpt2, whose training fits a CPU machine; gpt2-xl's is refused before that, on 24 GiB)
    for script, name, args in (('train.py', 'gpt2', ['--dataset=shakespeare_char', '--block_size=32']),
                               ('sample.py', 'gpt2-xl', [])):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), f'--init_from={name}', '--device=cpu',
                            f'--out_dir={tmp_path / "x"}', *args], cwd=ROOT, env=env, capture_output=True,
                            text=True,
                           timeout=300)
        assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: cannot load GPT-2 weights from '{name}'")


@pytest.mark.slow
def test_gpt2_without_a_network_is_one_line_at_once(tmp_path):
    """Not in the cache and the Hub unreachable: transformers retried for ~30 s before its error."""
    import subprocess
    import sys
    import time
    env = {k: v for k, v in os.environ.items() if k != 'HF_HUB_OFFLINE'}
    env.update(HF_HOME=str(tmp_path), HF_ENDPOINT='http://127.0.0.1:9')  # an empty cache; nothing there
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--init_from=gpt2', '--device=cpu'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "error: cannot load GPT-2 weights from 'gpt2': they are not in the Hugging Face cache, and "
        "http://127.0.0.1:9 cannot be reached (Connection refused)"), p.stderr[-2000:]
    assert time.time() - t0 < 20


def nanogpt_checkpoint(path, seed=0):
    """What nanoGPT's train.py saves: its dense GPT (same parameter names as model.GPT), AdamW with nanoGPT's
    two groups, model_args of its GPTConfig, and no RNG or scaler state."""
    torch.manual_seed(seed)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': 0.1},
                                   {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                                   lr=1e-3)
    x = torch.randint(65, (4, 32))
    model(x, x)[1].backward()
    optimizer.step()
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'model_args': model_args,
                'iter_num': 100, 'best_val_loss': torch.tensor(4.0),
                'config': {'dataset': 'shakespeare_char'}}, path)
    return model


@pytest.mark.slow
def test_a_nanogpt_checkpoint_resumes_here(shakespeare_char, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    nanogpt_checkpoint(str(out / 'ckpt.pt'))
    p = run('train.py', *TINY_OVERRIDES, '--dataset=shakespeare_char', '--init_from=resume',
            # n_expert is 8 by default: the checkpoint still decides (dense)
            '--max_iters=102', f'--out_dir={out}')
    assert 'note: the checkpoint has no RNG state' in p.stdout
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 102 and \
        set(ckpt['model_args']) == {f.name for f in dataclasses.fields(NanoGPTConfig)}
    run('sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=1', '--max_new_tokens=5')


@pytest.mark.slow
def test_a_dense_checkpoint_from_here_loads_in_nanogpt(shakespeare_char, tmp_path):
    """What nanoGPT's sample.py does with a checkpoint: GPTConfig(**model_args), strip '_orig_mod.', load."""
    out = tmp_path / 'out'
    run('train.py', *TINY_OVERRIDES, '--dataset=shakespeare_char', '--n_expert=0', f'--out_dir={out}')
    ckpt = torch.load(str(out / 'ckpt.pt'), map_location='cpu', weights_only=True)
    config = NanoGPTConfig(**ckpt['model_args'])  # nanoGPT: gptconf = GPTConfig(**checkpoint['model_args'])
    # nanoGPT's names are these
    nanogpt_names = GPT(GPTConfig(**dataclasses.asdict(config))).state_dict().keys()
    assert {k.removeprefix('_orig_mod.') for k in ckpt['model']} == set(nanogpt_names)
    assert ckpt['config']['dataset'] == 'shakespeare_char'  # where nanoGPT's sample.py looks for meta.pkl


@pytest.mark.slow
def test_wandb_logs_offline(shakespeare_char, tmp_path):
    pytest.importorskip('wandb')
    import subprocess
    import sys
    env = {**os.environ, 'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'}
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *TINY_OVERRIDES,
                        '--dataset=shakespeare_char', '--n_expert=4', '--expert_hidden=32',
                        '--wandb_log=True', f'--out_dir={tmp_path / "out"}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (run_file,) = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    data = open(run_file, 'rb').read()  # the run's records: the logged keys are there as plain strings
    for key in (b'train/ce', b'val/ce', b'grad_norm', b'layer0/max_load', b'layer1/load/expert3',
                b'layer1/flip_rate', b'train/loss', b'val/loss'):  # (and nanoGPT's names)
        assert key in data, key


def test_wandb_gets_nanogpts_names_too(tmp_path):
    """nanoGPT logs train/loss, val/loss, lr and mfu (in percent): dashboards made for its runs key on
    them."""
    from checkpoint import RunDir
    logged = []

    class Wandb:
        def log(self, data, step):
            logged.append((step, data))
    run_dir = RunDir(str(tmp_path), wandb=Wandb())
    run_dir.log({'iter': 0, 'train/ce': 4.2, 'val/ce': 4.3, 'lr': 1e-3})
    run_dir.log({'iter': 5, 'loss': 4.0, 'ce': 3.9, 'lr': 1e-3, 'mfu': 0.25, 'layer0/load': [0.75, 0.25]})
    os.close(run_dir.lock)
    (_, at_eval), (_, at_step) = logged
    assert (at_eval['train/loss'], at_eval['val/loss'], at_eval['lr']) == (4.2, 4.3, 1e-3)
    assert at_step['mfu'] == 25.0 and at_step['layer0/load/expert1'] == 0.25 and 'train/loss' not in at_step
    assert read_log(str(tmp_path))[1]['mfu'] == 0.25  # log.jsonl keeps its own: a fraction

# -----------------------------------------------------------------------------
# Hugging Face export


@pytest.mark.parametrize('kind', ['dense', 'moe'])
@pytest.mark.slow
def test_export_to_hugging_face_and_back(shakespeare_char, tmp_path, monkeypatch, kind):
    transformers = pytest.importorskip('transformers')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    out, hf_dir = tmp_path / 'out', tmp_path / 'hf'
    model_args = (['--n_expert=0', '--bias=False'] if kind == 'dense' else  # no biases: exported as zeros
                  ['--n_expert=4', '--top_k=2', '--expert_hidden=32', '--bias=True', '--router=aux_free',
                   '--n_shared_expert=1', '--n_layer=3', '--n_dense_layers=1'])
    run('train.py', *TINY_OVERRIDES, '--dataset=shakespeare_char', *model_args, f'--out_dir={out}')
    run('tools/export_hf.py', f'--out_dir={out}', f'--hf_dir={hf_dir}')
    from hf import load_hf_folder
    from moe_model import build_model
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    model = build_model(ckpt['model_args']).eval()
    model.load_state_dict(ckpt['model'])
    if kind == 'dense':
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    else:
        # self-contained: the code travels with the weights
        assert os.path.exists(hf_dir / 'modeling_nanomoe.py')
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    idx = torch.randint(65, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx, idx)[0]
        torch.testing.assert_close(hf(idx).logits, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_hf_folder(str(hf_dir)).eval()(idx, idx)[0], ours, rtol=1e-5,
                                   atol=1e-5)
        greedy = hf.generate(idx[:, :4], max_new_tokens=8, do_sample=False)
        x = idx[:, :4]
        for _ in range(8):
            x = torch.cat([x, model(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, x)
    # the folder says what it is and how to encode: shakespeare_char's characters (hf.describe)
    note = (hf_dir / 'README.md').read_text()
    assert ('NanoMoEForCausalLM' if kind == 'moe' else 'GPT2LMHeadModel') in note
    assert '"\\n !$&\',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"' in note
    assert not (hf_dir / 'vocab.json').exists()  # (GPT-2's BPE only)
    if kind == 'dense':  # bias=False comes back without GPT2LMHeadModel's zero biases
        assert not [k for k in load_hf_folder(str(hf_dir)).state_dict() if k.endswith('bias')]
    if kind == 'moe':  # init_from takes the exported folder back (a GPT-2 folder: the tests above), with the
        # run's own keys where config.json does not fix them
        run('train.py', *[a for a in TINY_OVERRIDES if not a.startswith('--n_layer')],
            '--dataset=shakespeare_char', f'--init_from={hf_dir}',
            f'--out_dir={tmp_path / "again"}', '--expert_impl=batched', '--aux_loss_coef=0.05',
            '--dropout=0.1')
        args = load_checkpoint(str(tmp_path / 'again' / 'ckpt.pt'))['model_args']
        assert (args['expert_impl'], args['aux_loss_coef'], args['dropout'],
                args['n_shared_expert']) == ('batched', 0.05, 0.1, 1)
    else:  # an existing folder is never overwritten
        p = run('tools/export_hf.py', f'--out_dir={out}', f'--hf_dir={hf_dir}', check=False)
        assert p.returncode == 2 and 'exists and is not an empty folder' in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['gpt2', 'qwen3_moe'])
def test_a_gpt2_bpe_export_has_its_tokenizer_and_generates_in_a_pipeline(tmp_path, monkeypatch, kind):
    """Without tokenizer files AutoTokenizer gave an empty tokenizer, and the text-generation pipeline failed
    (bos_token_id has to be defined). A GPT-2-block dense model and a modern MoE (transformers' own
    Qwen3MoeForCausalLM) alike."""
    transformers = pytest.importorskip('transformers')
    from moe_model import build_model
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    torch.manual_seed(0)
    model_args = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=50304,
                      dropout=0.0)
    if kind == 'qwen3_moe':
        model_args.update(norm='rmsnorm', rope=True, mlp='swiglu', qk_norm='head', tie_embeddings=False,
                          n_expert=4, top_k=2, expert_hidden=32)
    (tmp_path / 'out').mkdir()
    torch.save({'model': build_model(model_args).state_dict(), 'model_args': model_args,
                'config': {'dataset': 'openwebtext'}},  # no meta.pkl: GPT-2 BPE
               str(tmp_path / 'out' / 'ckpt.pt'))
    p = run('tools/export_hf.py', f'--out_dir={tmp_path / "out"}', f'--hf_dir={tmp_path / "hf"}')
    assert ('Qwen3MoeForCausalLM' if kind == 'qwen3_moe' else 'GPT2LMHeadModel') in p.stdout
    folder = str(tmp_path / 'hf')
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer('hello world<|endoftext|>').input_ids == [31373, 995, 50256]
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.bos_token_id == config.eos_token_id == 50256
    generate = transformers.pipeline('text-generation', model=folder)
    assert generate('hello', max_new_tokens=3, do_sample=False)[0]['generated_text'].startswith('hello')
    note = (tmp_path / 'hf' / 'README.md').read_text()
    assert "GPT-2's BPE" in note and 'vocab_size is 50304' in note
    assert ('"bias": false' in note) == (kind == 'gpt2')
    assert 'no trust_remote_code' in note and 'trust_remote_code=True' not in note


# -----------------------------------------------------------------------------
# sparse upcycling: an MoE whose experts start as a dense model's MLPs


def upcycled(dense, given=('n_expert',), **moe):
    from moe_model import MoEConfig
    from upcycle import upcycle_args, upcycle
    # train.py's defaults
    config = {**dataclasses.asdict(MoEConfig()), 'expert_hidden': 0, 'init_from': 'x', **moe}
    args = upcycle_args({**dataclasses.asdict(dense.config), 'n_expert': 0}, config, set(given))
    return args, upcycle(dense, args, config.get('upcycle_noise', 0.0))


MODERN = dict(norm='rmsnorm', rope=True, mlp='swiglu', qk_norm='head', n_kv_head=1, tie_embeddings=False)


@pytest.mark.parametrize('block', [{}, MODERN], ids=['gpt2', 'modern'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('slices,copies', [(1, 4), (2, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize('expert_impl', ['loop', 'grouped'])
def test_an_upcycled_model_computes_the_dense_function_at_step_0(bias, slices, copies, expert_impl, block):
    """Copied experts (slices=1, top-2) or granular ones (each a 1/slices cut of the MLP, top_k = slices): the
    chosen weights sum to 1, so the logits are the dense model's, whatever the (random) router picks."""
    torch.manual_seed(0)
    dense = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=50, bias=bias,
                          dropout=0.0, **block)).eval()
    args, moe = upcycled(dense, n_expert=slices * copies, expert_hidden=64 // slices, expert_impl=expert_impl,
                         n_dense_layers=1, given=('n_expert', 'expert_impl'))
    # the dense model's shape, the run's experts
    assert args['top_k'] == max(2, slices) and args['n_layer'] == 3
    moe.eval()
    idx = torch.randint(50, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(idx, idx)[0], dense(idx, idx)[0], rtol=1e-5, atol=1e-5)
        experts = moe.transformer.h[1].mlp.experts.c_fc
        assert not torch.equal(experts[0], experts[1]) if slices > 1 else torch.equal(experts[0], experts[-1])
    # upcycle_noise breaks the symmetry (and with it the exact copy)
    _, noisy = upcycled(dense, n_expert=slices * copies, expert_hidden=64 // slices, upcycle_noise=0.1)
    with torch.no_grad():
        assert (noisy.eval()(idx, idx)[0] - dense(idx, idx)[0]).abs().max() > 1e-4


def test_upcycling_refuses_what_it_cannot_copy_exactly():
    from upcycle import upcycle_args
    from moe_model import MoEConfig
    dense = {**dataclasses.asdict(GPTConfig(n_embd=16, n_head=2)), 'n_expert': 0}

    def error(given=('n_expert',), **moe):
        config = {**dataclasses.asdict(MoEConfig()), 'expert_hidden': 0, 'init_from': 'dense.pt', **moe}
        with pytest.raises(ValueError) as e:
            upcycle_args(dense, config, set(given))
        return str(e.value)

    assert 'expert_hidden=48 must divide' in error(n_expert=4, expert_hidden=48)
    assert 'n_expert=6 and top_k=4 must be multiples of 4' in error(n_expert=6, expert_hidden=16)
    assert 'n_expert=8 and top_k=2 must be multiples of 4' in error(given=('n_expert', 'top_k'), n_expert=8,
                                                                     expert_hidden=16, top_k=2)
    assert 'n_shared_expert=1' in error(n_expert=4, n_shared_expert=1)
    config = {**dataclasses.asdict(MoEConfig()), 'expert_hidden': 0, 'init_from': 'moe.pt', 'n_expert': 4}
    with pytest.raises(ValueError, match="init_from='moe.pt' is an MoE with n_expert=8"):
        upcycle_args({**dense, 'n_expert': 8}, config, {'n_expert'})
    assert upcycle_args({**dense, 'n_expert': 8}, {**config, 'n_expert': 8}, {'n_expert'}) is None  # as it is
    assert upcycle_args(dense, config, set()) is None  # n_expert not set: a dense model stays dense (nanoGPT)


@pytest.mark.slow
def test_upcycle_a_nanogpt_checkpoint_and_a_gpt2_folder_from_the_command_line(
        shakespeare_char, tiny_gpt2, tmp_path):
    """Step 0's eval of the upcycled model is the dense model's, to the printed digit; from a checkpoint file
    the run then trains and saves an MoE. A dense model stays dense unless n_expert is set (nanoGPT's
    finetuning)."""
    nanogpt_checkpoint(str(tmp_path / 'dense.pt'))
    # (a relative folder works)
    for init_from in (str(tmp_path / 'dense.pt'), os.path.relpath(tiny_gpt2, ROOT)):
        base = [*TINY_OVERRIDES, '--dataset=shakespeare_char', f'--init_from={init_from}', '--eval_iters=4']
        p_dense = run('train.py', *base, '--eval_only=True', f'--out_dir={tmp_path / "eval"}')
        train = init_from.endswith('.pt')  # (and the GPT-2 folder: its step 0 only)
        p = run('train.py', *base, '--n_expert=4', '--expert_hidden=64', f'--out_dir={tmp_path / "up"}',
                *([] if train else ['--eval_only=True']))  # 2 slices of the MLP's 128 hidden units: top_k=2
        step0 = [line for line in p_dense.stdout.splitlines() if line.startswith('step 0:')]
        assert step0 and step0[0] in p.stdout and 'sparse upcycling' in p.stdout \
            and 'sparse' not in p_dense.stdout
    ckpt = load_checkpoint(str(tmp_path / 'up' / 'ckpt.pt'))
    assert ckpt['model_args']['n_expert'] == 4 and ckpt['model_args']['top_k'] == 2 and ckpt['iter_num'] == 4
    # (no --expert_impl: 'auto', saved and logged as what it resolved to, 'grouped' on a CPU)
    assert ckpt['model_args']['expert_impl'] == ckpt['config']['expert_impl'] == 'grouped'
    assert [r['expert_impl'] for r in read_log(str(tmp_path / 'up'))
            if r.get('event') == 'start'] == ['grouped']
    p = run('train.py', *TINY_OVERRIDES, '--dataset=shakespeare_char', f'--init_from={tmp_path / "dense.pt"}',
            '--n_expert=3', '--expert_hidden=64', f'--out_dir={tmp_path / "bad"}', check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        'error: upcycling with expert_hidden=64 cuts each MLP into 2 slices: n_expert=3 and top_k=2 must be '
        'multiples of 2 (top_k=2 keeps the dense model\'s active FLOPs)']
    assert not (tmp_path / 'bad').exists()


def test_the_exported_moe_routes_like_ours_with_the_deepseek_v3_router():
    """hf/modeling_nanomoe.py's router is a copy of moe_model's: every router variant must agree (in
    process)."""
    pytest.importorskip('transformers')
    from hf import export_moe
    from moe_model import MoEGPT, MoEConfig
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, n_expert=4,
                             top_k=2, expert_hidden=32, router='deepseek_v3', route_scale=2.5)).eval()
    with torch.no_grad():
        for layer in model.moe_layers().values():
            layer.router.expert_bias.normal_(0, 0.5)  # a bias that changes which experts are picked
    idx = torch.randint(65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(export_moe(model).eval()(idx).logits, model(idx, idx)[0], rtol=1e-5,
                                   atol=1e-5)

# -----------------------------------------------------------------------------
# the seed forks' config files: their keys are translated (configurator.FORK_KEYS)

# the keys and values of sijunhe/nanoMoE's config/train_gpt2_moe_16_experts_top2.py (its other files differ
# in num_experts, top_k, batch_size and gradient_accumulation_steps only)
SIJUNHE_MOE_16_TOP2 = """
wandb_log = True
wandb_project = "owt-10k"
wandb_run_name = "gpt2-MoE-16experts(973M)-top2-aux-0.02"

batch_size = 3
block_size = 1024
gradient_accumulation_steps = 20 * 8

max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 100

use_moe = True
num_experts = 16
top_k = 2
expert_load_balance_loss_coef = 0.02

eval_interval = 200
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
"""

# the keys and values of wolfecameron/nanoMoE's config/train_nano_moe.py
WOLFE_NANO_MOE = """
import time

wandb_log = True
init_from = 'scratch'
wandb_project = 'nano-moe'
wandb_run_name = 'gpt2-124M-moe-owt ' + time.strftime('%Y-%m-%d %H:%M:%S')

n_exp = 8
top_k = 2
use_aux_loss = True
aux_loss_weight = 0.01
use_router_z_loss = True
router_z_loss_weight = 0.001
use_noisy_top_k = False
train_capacity = 1.25
eval_capacity = 2.0
stride = 2
use_switch_tfm_init = True
router_use_full_prec = True

n_layer = 6
n_head = 6
n_embd = 384

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 50000
lr_decay_iters = 50000

eval_interval = 500
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
"""

FORK_RUN = [*TINY_OVERRIDES, '--dataset=shakespeare_char', '--gradient_accumulation_steps=1', '--max_iters=2',
            '--warmup_iters=0', '--wandb_log=False']


@pytest.mark.slow
def test_sijunhe_config_runs_unchanged_and_its_keys_work_on_the_command_line(shakespeare_char, tmp_path):
    config = tmp_path / 'train_gpt2_moe_16_experts_top2.py'
    config.write_text(SIJUNHE_MOE_16_TOP2)
    out = tmp_path / 'out'
    p = run('train.py', str(config), *FORK_RUN, '--num_experts=4', f'--out_dir={out}')
    assert ("translated from sijunhe/nanoMoE's keys: use_moe=True -> moe_every=1; num_experts=16 -> "
            "n_expert=16; expert_load_balance_loss_coef=0.02 -> aux_loss_coef=0.02\n") in p.stdout
    assert "translated from sijunhe/nanoMoE's keys: num_experts=4 -> n_expert=4\n" in p.stdout
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 2
    for args in (ckpt['model_args'], ckpt['config']):
        assert (args['n_expert'], args['top_k'], args['moe_every'], args['aux_loss_coef']) == (4, 2, 1, 0.02)


@pytest.mark.slow
def test_wolfe_config_runs_unchanged(shakespeare_char, tmp_path):
    config = tmp_path / 'train_nano_moe.py'
    config.write_text(WOLFE_NANO_MOE)
    out = tmp_path / 'out'
    p = run('train.py', str(config), *FORK_RUN, f'--out_dir={out}')
    translated = [line for line in p.stdout.splitlines() if line.startswith('translated from wolfecameron')]
    ignored = [line for line in p.stdout.splitlines() if line.startswith('ignored wolfecameron')]
    assert len(translated) == 1 and len(ignored) == 1, p.stdout
    assert 'eval_capacity=2.0: ' in ignored[0] and 'use_switch_tfm_init=True: ' in ignored[0]
    assert 'router_use_full_prec=True -> (the router always runs in float32 here)' in translated[0]
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    assert ckpt['iter_num'] == 2
    want = dict(n_expert=8, top_k=2, moe_every=2, aux_loss_coef=0.01, z_loss_coef=0.001, router_noise=False,
                capacity_factor=1.25, expert_impl='batched')
    for args in (ckpt['model_args'], ckpt['config']):
        assert {k: args[k] for k in want} == want
    assert ckpt['model_args']['n_layer'] == 2  # the command line's, over the file's n_layer = 6
    # no key of the forks is one of train.py's (there, the fork's meaning would be lost)
    p = run('train.py', '--no_such_key=1', check=False)
    assert not set(FORK_KEYS) & set(p.stderr.split('known keys: ')[1].strip().split(', '))


def train_keys():
    """train.py's model keys at their defaults there, and the run keys that FORK_KEYS translates into."""
    return {**{f.name: f.default for f in dataclasses.fields(MoEConfig)}, 'expert_impl': 'auto',
            'activation_checkpointing': 'none'}


# every key of FORK_KEYS: what it becomes here (this repo's keys), or a part of the reason it is ignored
FORK_CASES = [
    ('use_moe', True, {'moe_every': 1}), ('use_moe', False, {'n_expert': 0}),
    ('num_experts', 16, {'n_expert': 16}),
    ('expert_load_balance_loss_coef', 0.02, {'aux_loss_coef': 0.02}),
    ('gradient_checkpointing', True, {'activation_checkpointing': 'all'}),
    ('gradient_checkpointing', False, {'activation_checkpointing': 'none'}),
    ('n_exp', 8, {'n_expert': 8}), ('n_exp', 1, {'n_expert': 0}),  # one expert: wolfe's dense GPT
    ('use_aux_loss', True, {}), ('use_aux_loss', False, {'aux_loss_coef': 0.0}),
    ('aux_loss_weight', 0.02, {'aux_loss_coef': 0.02}),
    ('use_router_z_loss', True, {}), ('use_router_z_loss', False, {'z_loss_coef': 0.0}),
    ('router_z_loss_weight', 0.01, {'z_loss_coef': 0.01}),
    ('use_noisy_top_k', True, {'router_noise': True}), ('use_noisy_top_k', False, {'router_noise': False}),
    ('train_capacity', 1.5, {'capacity_factor': 1.5, 'expert_impl': 'batched'}),
    ('eval_capacity', 2.0, 'applies at eval too here'),
    ('min_capacity', 4, 'with no minimum'),
    ('stride', 2, {'moe_every': 2}),
    ('use_switch_tfm_init', False, {}), ('use_switch_tfm_init', True, "not Switch's"),
    ('switch_tfm_init_scale', 0.1, "not Switch's"),
    ('router_use_full_prec', True, {}), ('router_use_full_prec', False, 'always runs in float32 here'),
]


def test_every_fork_key_is_translated_or_ignored_with_a_reason():
    assert {key for key, _, _ in FORK_CASES} == set(FORK_KEYS)
    assert not set(FORK_KEYS) & set(MODEL_KEYS)


@pytest.mark.parametrize('key, value, want', FORK_CASES)
def test_a_fork_key_on_the_command_line(key, value, want, capsys):
    given = set()
    config = configure(train_keys(), [f'--{key}={value}'], given, foreign=FORK_KEYS)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1, printed
    fork = FORK_KEYS[key].fork
    if isinstance(want, str):  # ignored: nothing changes, one line says why
        assert given == set() and config == train_keys()
        assert printed[0].startswith(f"ignored {fork}'s keys: {key}={value!r}: ") and want in printed[0]
    else:
        assert {k: config[k] for k in given} == want and given == set(want)
        assert printed[0].startswith(f"translated from {fork}'s keys: {key}={value!r} -> ")


@pytest.mark.parametrize('switch, weight, target', [
    ('use_aux_loss', 'aux_loss_weight', 'aux_loss_coef'),
    ('use_router_z_loss', 'router_z_loss_weight', 'z_loss_coef'),
    ('use_moe', 'num_experts', 'n_expert'),
])
def test_a_switch_wins_over_its_weight_in_any_order(switch, weight, target, tmp_path, capsys):
    for i, text in enumerate([f'{weight} = 4\n{switch} = False\n', f'{switch} = False\n{weight} = 4\n']):
        (tmp_path / f'{i}.py').write_text(text)
        assert not configure(train_keys(), [str(tmp_path / f'{i}.py')], foreign=FORK_KEYS)[target]
        assert f"{weight}=4: {switch}=False turns it off" in capsys.readouterr().out
    # across sources too, as in the fork: a later weight stays off, until the switch turns on
    args = [str(tmp_path / '0.py'), f'--{weight}=8']
    assert not configure(train_keys(), args, foreign=FORK_KEYS)[target]
    assert configure(train_keys(), [*args, f'--{switch}=True'], foreign=FORK_KEYS)[target] == 8


def test_a_file_in_both_dialects_and_an_unknown_key_is_still_one_error_line(tmp_path, capsys):
    (tmp_path / 'mixed.py').write_text('n_exp = 4\naux_loss_coef = 0.05\nuse_aux_loss = False\n'
                                       'dropout = 0.1\n')
    config = configure(train_keys(), [str(tmp_path / 'mixed.py')], foreign=FORK_KEYS)
    assert (config['n_expert'], config['aux_loss_coef'], config['dropout']) == (4, 0.0, 0.1)
    capsys.readouterr()
    (tmp_path / 'typo.py').write_text('n_exps = 4\n')
    with pytest.raises(SystemExit) as e:
        configure(train_keys(), [str(tmp_path / 'typo.py')], foreign=FORK_KEYS)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith("error: unknown config key 'n_exps'")
    with pytest.raises(SystemExit):  # a translated value of the wrong type names the fork's key
        configure(train_keys(), ['--num_experts=8.5'], foreign=FORK_KEYS)
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: n_expert=8.5 (from --num_experts=8.5, for ')
