"""transformers' own classes both ways (hf/native.py): folders that Mixtral, Qwen3-MoE, OLMoE, Llama and Qwen3
wrote load here with the same logits; this repo's models export as those classes (no trust_remote_code) with
the same logits and greedy tokens; a config this repo cannot compute is one error line naming the field."""
import json
import os

import pytest
import torch

from conftest import run, TINY, tiny_tokenizer
from checkpoint import load_checkpoint

transformers = pytest.importorskip('transformers')

from hf import export, hf_model_args, load_hf_folder, save  # noqa: E402
from hf.native import NATIVE, covered  # noqa: E402
from model import GPTConfig, keys_of  # noqa: E402
from moe_model import EXPORTED_KEYS, build_model  # noqa: E402

# tiny models of transformers' classes: GQA, an odd rope_theta and eps, so that a field read wrong shows
SMALL = dict(vocab_size=65, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5e4, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
FOREIGN = {
    'mixtral': ('Mixtral', dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    'qwen3_moe': ('Qwen3Moe', dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                   num_experts_per_tok=2, head_dim=8, norm_topk_prob=True)),
    'qwen3_moe-sparse': ('Qwen3Moe', dict(num_hidden_layers=5, intermediate_size=48, moe_intermediate_size=16,
                                          num_experts=4, num_experts_per_tok=3, head_dim=8,
                                          decoder_sparse_step=2, mlp_only_layers=[0, 1],
                                          tie_word_embeddings=True)),
    # top-1 with norm_topk_prob=True: every weight 1.0 (norm_top1)
    'qwen3_moe-top1': ('Qwen3Moe', dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                        num_experts_per_tok=1, head_dim=8, norm_topk_prob=True)),
    'mixtral-top1': ('Mixtral', dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=1)),
    # norm_topk_prob=False
    'olmoe': ('Olmoe', dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    'olmoe-top1': ('Olmoe', dict(intermediate_size=16, num_experts=4, num_experts_per_tok=1)),
    'llama': ('Llama', dict(intermediate_size=48)),
    'llama-biases': ('Llama', dict(intermediate_size=48, attention_bias=True, mlp_bias=True,
                                   num_key_value_heads=4)),
    'qwen3': ('Qwen3', dict(intermediate_size=48, head_dim=8, tie_word_embeddings=True)),
    'qwen3-wide-heads': ('Qwen3', dict(intermediate_size=48, head_dim=16)),  # wider than hidden / heads
}


def foreign(kind, folder, **changes):
    """A tiny random model of a transformers class, saved (save_pretrained) in folder; its routers and norms
    far from their init, so that a wrong expert choice, norm or renormalisation shows in the logits."""
    prefix, extra = FOREIGN[kind]
    torch.manual_seed(0)
    config = getattr(transformers, prefix + 'Config')(**{**SMALL, **extra, **changes})
    hf = getattr(transformers, prefix + 'ForCausalLM')(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith('mlp.gate.weight'):
                p.normal_(0, 1.0)
            elif 'norm' in name or name.endswith('bias'):
                p.normal_(1.0 if 'norm' in name else 0.0, 0.3)
    hf.save_pretrained(folder)
    return hf


IDX = torch.randint(65, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('kind', FOREIGN)
def test_a_transformers_folder_loads_here_with_the_same_logits(kind, tmp_path):
    hf = foreign(kind, tmp_path)
    model = load_hf_folder(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDX, IDX)[0], hf(IDX).logits, rtol=1e-5, atol=1e-5)
    if kind == 'qwen3_moe-sparse':  # layers 3 (of 0..4) alone is MoE: 0, 1 are mlp_only, 2 and 4 off the step
        assert [i for i in range(5) if model.config.is_moe_layer(i)] == [3]
        assert (model.config.moe_every, model.config.n_dense_layers, model.config.mlp_hidden) == (2, 2, 48)
    if kind == 'olmoe-top1':  # top-1 with norm_topk_prob=False: the router's probability, as here
        assert model.config.top_k == 1 and not model.config.renormalises()
    if kind.endswith('top1') and kind != 'olmoe-top1':  # renormalised: every weight 1.0
        assert model.config.top_k == 1 and model.config.norm_top1 and model.config.renormalises()


@pytest.mark.parametrize('kind', ['llama', 'qwen3'])
def test_a_dense_transformers_folder_upcycles_into_the_same_function(kind, tmp_path):
    """Sparse upcycling from a Llama or Qwen3: top-2 of 4 copies of each MLP, renormalised, is the MLP."""
    from dataclasses import asdict
    from moe_model import MoEConfig
    from upcycle import upcycle, upcycle_args
    hf = foreign(kind, tmp_path)
    dense = load_hf_folder(str(tmp_path))
    config = {**asdict(MoEConfig()), 'expert_hidden': 0, 'init_from': str(tmp_path), 'n_expert': 4,
              'top_k': 2}
    moe = upcycle(dense, upcycle_args({**asdict(dense.config), 'n_expert': 0}, config, {'n_expert'}),
                  0.0).eval()
    assert moe.config.n_expert == 4 and moe.config.qk_norm == dense.config.qk_norm
    with torch.no_grad():
        torch.testing.assert_close(moe(IDX, IDX)[0], hf(IDX).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['mixtral', 'qwen3_moe'])
def test_a_transformers_folder_fine_tunes_from_the_command_line(kind, shakespeare_char, tmp_path):
    """train.py --init_from=<folder>: the checkpoint after steps at learning rate 0 holds the folder's
    model."""
    hf = foreign(kind, tmp_path / 'hf', max_position_embeddings=32)
    out = tmp_path / 'out'
    tiny = [a for a in TINY if not a.startswith(('--n_layer', '--n_head', '--n_embd', '--n_expert', '--top_k',
                                                 '--expert_hidden', '--block_size', '--learning_rate'))]
    run('train.py', *tiny, f'--init_from={tmp_path / "hf"}', f'--out_dir={out}', '--max_iters=2',
        '--learning_rate=0', '--eval_interval=2', '--expert_impl=loop')
    if kind == 'mixtral':  # bench.py times the folder's model
        p = run('bench.py', f'--init_from={tmp_path / "hf"}', '--block_size=16', '--batch_size=2',
                '--device=cpu', '--dtype=float32', '--bench_iters=1', '--warmup_iters=0')
        assert 'ms/iter' in p.stdout
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    model = build_model(ckpt['model_args']).eval()
    model.load_state_dict(ckpt['model'])
    with torch.no_grad():
        torch.testing.assert_close(model(IDX, IDX)[0], hf(IDX).logits, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# this repo's models, exported as transformers' classes

MODERN = dict(norm='rmsnorm', rope=True, mlp='swiglu', bias=False, norm_eps=1e-6, rope_theta=5e4, n_kv_head=2,
              tie_embeddings=False)
MOE = dict(MODERN, n_expert=4, top_k=2, expert_hidden=16)
OURS = {  # the model keys, and the class each exports as
    'MixtralForCausalLM': dict(MOE, qk_norm='none'),
    'Qwen3MoeForCausalLM': dict(MOE, qk_norm='head', n_layer=5, moe_every=2, n_dense_layers=2, mlp_hidden=48),
    'Qwen3MoeForCausalLM-top1': dict(MOE, qk_norm='head', top_k=1, tie_embeddings=True),
    'MixtralForCausalLM-top1': dict(MOE, qk_norm='none', top_k=1, norm_top1=True),  # every weight 1.0
    'OlmoeForCausalLM': dict(MOE, qk_norm='full', norm_topk=False, top_k=3),
    'LlamaForCausalLM': dict(MODERN, n_expert=0, qk_norm='none', mlp_hidden=48, bias=True),
    'Qwen3ForCausalLM': dict(MODERN, n_expert=0, qk_norm='head', tie_embeddings=True),
    'GPT2LMHeadModel': dict(n_expert=0, bias=False, mlp_hidden=48, norm_eps=1e-6),
}


def ours(**keys):
    torch.manual_seed(0)
    model = build_model({**dict(n_layer=3, n_head=4, n_embd=32, vocab_size=65, block_size=64), **keys}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('router.gate.weight'):
                p.normal_(0, 1.0)
            elif '.ln_' in name or 'norm' in name or name.endswith('bias'):
                p.normal_(1.0 if name.endswith('weight') else 0.0, 0.3)
    return model


@pytest.mark.parametrize('name', OURS)
def test_a_model_exported_natively_loads_without_remote_code_with_the_same_logits_and_tokens(name, tmp_path):
    model = ours(**OURS[name])
    hf_model, why = export(model)
    assert type(hf_model).__name__ == name.split('-')[0] and 'trust_remote_code' not in why.split(':')[0]
    save(hf_model, str(tmp_path))
    assert not any(f.endswith('.py') for f in os.listdir(tmp_path))  # transformers' own code, none of ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # no trust_remote_code
    assert type(hf).__name__ == name.split('-')[0]
    with torch.no_grad():
        logits = model(IDX, IDX)[0]
        torch.testing.assert_close(hf(IDX).logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_hf_folder(str(tmp_path)).eval()(IDX, IDX)[0], logits, rtol=1e-5,
                                   atol=1e-5)
        greedy = hf.generate(IDX[:, :4], max_new_tokens=30, do_sample=False)
        assert torch.equal(greedy, model.generate(IDX[:, :4], 30, top_k=1))


def test_the_export_picks_the_remote_class_and_says_why(tmp_path):
    cases = [  # (keys, the key the one line names)
        (dict(MOE, qk_norm='none', n_shared_expert=1), 'n_shared_expert=0 (this model: 1)'),
        (dict(MOE, qk_norm='head', router='deepseek_v3'), "router_score='softmax' (this model: 'sigmoid')"),
        # Mixtral: 1 expert weighs 1.0
        (dict(MOE, qk_norm='none', top_k=1), 'norm_topk=True (this model: False)'),
        (dict(n_expert=4, top_k=2), "norm='rmsnorm' (this model: 'layernorm')"),  # GPT-2's block with experts
        (dict(MODERN, n_expert=0, qk_norm='full'), "qk_norm='head' (this model: 'full')"),
        (dict(MODERN, n_expert=0, rope=False), 'rope=True (this model: False)')]
    for i, (keys, named) in enumerate(cases):
        model = ours(**keys)
        hf_model, why = export(model)
        assert type(hf_model).__name__ == 'NanoMoEForCausalLM' and '\n' not in why and named in why, why
        assert why.startswith('NanoMoEForCausalLM, with its code (trust_remote_code=True)')
        save(hf_model, str(tmp_path / str(i)))  # back as what it was: untied heads untied, dense models dense
        back = load_hf_folder(str(tmp_path / str(i))).eval()
        assert type(back) is type(model)
        # the exported class runs 'loop' (the CPU's fused op: ~1e-8 off)
        if hasattr(model, 'set_expert_impl'):
            model.set_expert_impl('loop')
            back.set_expert_impl('loop')
        with torch.no_grad():
            assert torch.equal(hf_model.eval()(IDX).logits, model(IDX, IDX)[0])
            assert torch.equal(back(IDX, IDX)[0], model(IDX, IDX)[0])


def test_every_class_row_says_what_it_does_with_every_exported_key():
    """A key added to the registry must be decided on for every class: mapped, fixed, or unused."""
    dense, moe = set(keys_of(GPTConfig, 'shape', 'forward')), set(EXPORTED_KEYS)
    for name, native in NATIVE.items():
        assert covered(native) == (moe if native.moe else dense), name


# -----------------------------------------------------------------------------
# what this repo cannot compute is refused: one line, naming the field

REFUSED = [  # (kind, config changes, the field the error names)
    ('qwen3', dict(use_sliding_window=True, max_window_layers=1), 'use_sliding_window=True'),
    ('mixtral', dict(sliding_window=16), 'sliding_window=16'),
    ('llama', dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}),
     "rope_parameters.rope_type='linear'"),
    ('llama', dict(partial_rotary_factor=0.5), 'rope_parameters.partial_rotary_factor=0.5'),
    ('llama', dict(hidden_act='gelu'), "hidden_act='gelu'"),
    ('llama', dict(attention_bias=True), 'mlp_bias=False'),  # biased q/k/v/o, but no MLP bias
    ('qwen3', dict(attention_bias=True), 'attention_bias=True'),
    ('olmoe', dict(clip_qkv=8.0), 'clip_qkv=8.0'),
    ('qwen3_moe', dict(mlp_only_layers=[1]), 'mlp_only_layers=[1]'),
    ('mixtral', dict(quantization_config={'quant_method': 'fp8'}), 'quantization_config='),
]


@pytest.mark.parametrize('kind,changes,field', REFUSED, ids=[f'{k}-{f.split("=")[0]}' for k, _, f in REFUSED])
def test_a_config_this_repo_cannot_compute_is_one_error_line_naming_the_field(kind, changes, field, tmp_path):
    prefix, extra = FOREIGN[kind]
    getattr(transformers, prefix + 'Config')(**{**SMALL, **extra, **changes}).save_pretrained(tmp_path)
    for read in (hf_model_args, load_hf_folder):  # before any weights are read: config.json alone
        with pytest.raises(ValueError) as e:
            read(str(tmp_path))
        assert '\n' not in str(e.value) and field in str(e.value) and str(tmp_path) in str(e.value), \
            str(e.value)


def test_a_class_this_repo_does_not_load_is_one_error_line(tmp_path):
    # (Mixtral's dense twin)
    transformers.MistralConfig(**SMALL, intermediate_size=48).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'mistral' model \(config.json\), "
                                         r"which this repo does not load"):
        load_hf_folder(str(tmp_path))


@pytest.mark.parametrize('case', ['no model_type', 'relu', 'untied', 'unscaled', 'missing weight'])
def test_a_gpt2_folder_that_is_not_gpt2s_model_is_one_error_line(case, tmp_path):
    """GPT-2 folders are checked as the native classes are: a config.json without model_type (a Mixtral's
    loaded as GPT-2 with every weight made up, before), a setting model.GPT does not compute, a missing
    weight."""
    changes = {'relu': dict(activation_function='relu'), 'untied': dict(tie_word_embeddings=False),
               'unscaled': dict(scale_attn_weights=False)}.get(case, {})
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=65, n_positions=64, **changes)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    path = tmp_path / 'config.json'
    if case == 'no model_type':
        cfg = json.loads(path.read_text())
        del cfg['model_type']
        path.write_text(json.dumps(cfg))
    if case == 'missing weight':
        from safetensors.torch import load_file, save_file
        sd = load_file(tmp_path / 'model.safetensors')
        del sd['transformer.h.1.mlp.c_fc.weight']
        save_file(sd, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
    want = {'no model_type': 'has no model_type', 'relu': "activation_function='relu'",
            'untied': 'tie_word_embeddings=False', 'unscaled': 'scale_attn_weights=False',
            'missing weight': 'missing keys'}[case]
    with pytest.raises(ValueError) as e:
        load_hf_folder(str(tmp_path))
    assert '\n' not in str(e.value) and want in str(e.value), str(e.value)


@pytest.mark.slow
def test_sample_and_train_refuse_a_folder_in_one_line(shakespeare_char, tmp_path):
    """The issue's case: sample.py once loaded a Mixtral folder as a GPT-2 and printed noise, exit 0."""
    foreign('qwen3', tmp_path / 'hf', use_sliding_window=True, max_window_layers=1)
    for script, args in (('sample.py', ['--device=cpu', '--num_samples=1', '--max_new_tokens=5']),
                         ('train.py', [*TINY, f'--out_dir={tmp_path / "out"}']),
                         ('bench.py', ['--device=cpu']), ('tools/eval_hellaswag.py', ['--device=cpu'])):
        p = run(script, *args, f'--init_from={tmp_path / "hf"}', check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (script, p.stderr[-2000:])
        assert p.stderr.startswith('error: ') and 'use_sliding_window=True' in p.stderr, p.stderr


@pytest.mark.slow
def test_sample_encodes_with_the_folders_own_tokenizer(tmp_path):
    """sample.py once encoded every folder's prompt with GPT-2's BPE: ids out of this 65-token vocabulary."""
    foreign('qwen3_moe', tmp_path)
    tiny_tokenizer(tmp_path)
    p = run('sample.py', f'--init_from={tmp_path}', '--start=the cat sat', '--num_samples=1',
            '--max_new_tokens=3', '--device=cpu', '--dtype=float32')
    words = p.stdout.split("own tokenizer")[1].splitlines()[1].split()  # the prompt, then 3 tokens decoded
    assert words[:3] == ['the', 'cat', 'sat'] and len(words) == 6, p.stdout
    tiny_tokenizer(tmp_path, vocab_size=100)  # more words than the model's 65: one line, not a traceback
    p = run('sample.py', f'--init_from={tmp_path}', '--start=the cat', '--device=cpu', check=False)
    assert p.returncode == 2 and p.stderr == f"error: {tmp_path}'s tokenizer has 100 tokens, more than the " \
        "model's vocab_size=65: they do not belong together\n", p.stderr  # (before any weight loads)



@pytest.mark.slow
def test_a_run_that_fine_tunes_a_folder_keeps_its_tokenizer(tmp_path):
    """The folder's tokenizer goes with the run (out_dir): a resume's HellaSwag, sample.py from the checkpoint
    and the export encode with it, not with GPT-2's BPE (an export once wrote it for any large vocabulary)."""
    folder, data, out, export = (tmp_path / d for d in ('hf', 'ids', 'out', 'export'))
    foreign('qwen3_moe', folder)
    tiny_tokenizer(folder)
    data.mkdir()
    for split in ('train', 'val'):
        torch.randint(65, (400,), dtype=torch.int16).numpy().astype('uint16').tofile(data / f'{split}.bin')
    common = [f'--dataset={data}', f'--out_dir={out}', '--device=cpu', '--block_size=32', '--batch_size=4',
              '--eval_iters=1', '--eval_interval=2', '--gradient_accumulation_steps=1', '--compile=False']
    run('train.py', f'--init_from={folder}', '--max_iters=2', *common)
    assert (out / 'tokenizer.json').is_file()
    p = run('train.py', '--init_from=resume', '--max_iters=4', *common, '--hellaswag_interval=2', check=False)
    assert 'no tokenizer files' not in p.stderr and 'GPT-2 BPE' not in p.stderr  # (then HellaSwag's file)
    for source in (['--init_from=resume', f'--out_dir={out}'], None):
        if source is None:
            run('tools/export_hf.py', f'--out_dir={out}', f'--hf_dir={export}')
            assert (export / 'tokenizer.json').is_file() and not (export / 'merges.txt').exists()
            source = [f'--init_from={export}']
        p = run('sample.py', *source, '--start=the cat sat', '--num_samples=1', '--max_new_tokens=3',
                '--device=cpu', '--dtype=float32')
        words = p.stdout.split("own tokenizer")[1].splitlines()[1].split()
        assert words[:3] == ['the', 'cat', 'sat'] and len(words) == 6, p.stdout

@pytest.mark.slow
def test_a_folder_without_a_tokenizer_or_gpt2s_vocabulary_is_one_error_line(tmp_path):
    folder, data = tmp_path / 'hf', tmp_path / 'ids'  # data: a dataset with no meta.pkl, as a BPE one
    foreign('qwen3_moe', folder)  # vocab_size=65, no tokenizer files
    data.mkdir()
    for split in ('train', 'val'):
        torch.randint(65, (200,), dtype=torch.int16).numpy().astype('uint16').tofile(data / f'{split}.bin')
    for script, args in (('sample.py', []), ('tools/eval_hellaswag.py', []),
                         ('train.py', [f'--dataset={data}', '--block_size=32', '--hellaswag_interval=1',
                                       f'--out_dir={tmp_path / "out"}'])):
        p = run(script, f'--init_from={folder}', '--device=cpu', *args, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (script, p.stderr[-2000:])
        assert f'{folder} has no tokenizer files' in p.stderr and p.stderr.startswith('error: ') \
            and 'vocab_size=65' in p.stderr and 'a tokenizer is needed' in p.stderr, p.stderr


def test_an_exported_gpt2_bpe_folder_encodes_as_tiktoken_does(tmp_path):
    """describe writes GPT-2's tokenizer files into a GPT-2 BPE export: AutoTokenizer on them gives tiktoken's
    ids, specials included; a folder without them and GPT-2's vocab_size is tiktoken's own."""
    from data.tiktoken_offline import get_gpt2_encoding
    from hf import describe, folder_tokenizer
    gpt2 = get_gpt2_encoding(verbose=False)
    (tmp_path / 'bare').mkdir()
    assert folder_tokenizer(str(tmp_path / 'bare'), 50257) is gpt2
    (tmp_path / 'config.json').write_text('{"model_type": "gpt2"}')
    describe(str(tmp_path), dict(vocab_size=50304, block_size=64, n_expert=0))
    enc = folder_tokenizer(str(tmp_path), 50304)
    assert hasattr(enc, 'tokenizer')  # (AutoTokenizer's, not tiktoken)
    text = "Hello  world!\n\n  It's 2024: naïve café, 東京 — ok?<|endoftext|> again\t 12345 "
    assert enc.encode(text) == gpt2.encode(text, allowed_special={'<|endoftext|>'})
    ordinary = text.replace('<|endoftext|>', '')
    assert enc.encode_ordinary(ordinary) == gpt2.encode_ordinary(ordinary)
    assert enc.decode(gpt2.encode_ordinary(ordinary)) == ordinary


@pytest.mark.slow
def test_export_hf_writes_the_native_class_and_says_so(shakespeare_char, tmp_path):
    out, hf_dir = tmp_path / 'out', tmp_path / 'hf'
    olmoe = ['--norm=rmsnorm', '--rope=True', '--mlp=swiglu', '--qk_norm=full', '--bias=False',
             '--tie_embeddings=False', '--norm_topk=False', '--max_iters=4']
    run('train.py', *TINY, f'--out_dir={out}', *olmoe)
    p = run('tools/export_hf.py', f'--out_dir={out}', f'--hf_dir={hf_dir}')
    assert ('exporting as OlmoeForCausalLM: its block and every key map onto it (no trust_remote_code)'
            in p.stdout)
    with open(hf_dir / 'config.json') as f:
        assert json.load(f)['architectures'] == ['OlmoeForCausalLM']
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    model = build_model(ckpt['model_args']).eval()
    model.load_state_dict(ckpt['model'])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, model(IDX, IDX)[0], rtol=1e-5, atol=1e-5)
