# Issue 23's study: does the MoE win at equal loss, per FLOP and per second on this CPU? shakespeare_char,
# OLMoE's modern block (config/train_shakespeare_char_olmoe_cpu.py: RMSNorm, rope, SwiGLU, q/k norm, untied
# head), three sizes spanning 5.3x in active parameters (S 3 layers x 96: 0.37M; M 4 x 128: 0.87M, the CPU
# demo's; L 4 x 192: 1.95M), SwiGLU hidden 3 * n_embd. Per size, at the dense MLP's active FLOPs:
#   dense    the dense MLP
#   moe8     8 experts of mlp_hidden / 2, top-2 (3.0x the dense model's parameters at M)
#   moe32    32 fine-grained experts of mlp_hidden / 8, top-8 (as many parameters; OLMoE's granularity)
# and at M, the dense model and moe8 again with optimizer='muon' (muon.py: Muon for the hidden matrices
# and every expert's, AdamW for the rest; muon_lr 0.02). Within a size every run takes the same steps
# (768 tokens each), the same cosine schedule (lr 1e-3 to 1e-4, 100 warmup steps) and, per seed, the same
# data order and eval batches. Two seeds. The table's second part (tools/study.py, baselines) gives per run
# the compute multiplier against its dense twin (dense FLOPs to reach the run's final val loss over the
# run's FLOPs), the same in training seconds, and the loss gaps at equal FLOPs and equal seconds; Muon's
# dense runs are measured against AdamW's.
# The anchor that nobody here tuned: nanoGPT's README CPU command, unchanged (GPT-2's block, 4 x 128, 2000
# steps; nanoGPT prints a val loss of ~1.88), dense with --n_expert=0 (config/train_shakespeare_char.py is
# dense already), and its MoE twin on the same command (8 experts of 2 * n_embd, top-2).
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/multiplier.py
# Time: 26 runs (13 x 2 seeds), 2000 steps each, evals (every 100 steps, 2 x 20 batches) ~13% on top. The
# first plan (M 3000 and L 4000 steps, moe32 with Muon too: ~70 min estimated on a quiet CPU-2) measured
# 2x slower on the day (2026-12-06: a dense S step took 33 ms, not the estimated 17), so it was cut to this,
# 66 minutes on that machine (58 of training; RESULTS.md section 14). Step costs, as multiples of the
# anchor's dense step (GPT-2's block, 4 x 128), timed in turn on one thread:
#   S  dense 0.67, moe8 0.76, moe32 0.88       M  dense 1.10, moe8 1.39, moe32 1.67
#   L  dense 2.05, moe8 2.47, moe32 3.32       M with Muon  dense 1.42, moe8 2.18
#   anchor  dense 1.00, moe8 1.34
# (Muon's Newton-Schulz runs in bfloat16, slow on this CPU.) A killed study resumes where it stopped.
title = ('compute multiplier: dense vs MoE (8 top-2, 32 top-8), 3 sizes, AdamW vs Muon '
         '(shakespeare_char, CPU)')
out_dir = 'out-study-multiplier'
results = 'assets/study_multiplier'
seeds = [1337, 1338]
_block = ['config/train_shakespeare_char_olmoe_cpu.py', '--eval_interval=100', '--log_interval=10']
# layers, width, heads, steps
_sizes = {'S': (3, 96, 3, 2000), 'M': (4, 128, 4, 2000), 'L': (4, 192, 6, 2000)}
runs, baselines, _muon = {}, {}, {}
for _size, (_layers, _width, _heads, _steps) in _sizes.items():
    _hidden = 3 * _width  # the CPU demo's 384 at 128 wide
    _model = _block + [f'--n_layer={_layers}', f'--n_embd={_width}', f'--n_head={_heads}',
                       f'--mlp_hidden={_hidden}', f'--max_iters={_steps}', f'--lr_decay_iters={_steps}']
    _arms = {'dense': ['--n_expert=0'],
             'moe8': ['--n_expert=8', '--top_k=2', f'--expert_hidden={_hidden // 2}'],
             'moe32': ['--n_expert=32', '--top_k=8', f'--expert_hidden={_hidden // 8}']}
    for _arm, _args in _arms.items():
        runs[f'{_arm}-{_size}'] = _model + _args
        if _arm != 'dense':
            baselines[f'{_arm}-{_size}'] = f'dense-{_size}'
    if _size == 'M':  # Muon at the middle size: the dense model and the 8-expert MoE
        for _arm in ('dense', 'moe8'):
            _muon[f'{_arm}-M-muon'] = _model + _arms[_arm] + ['--optimizer=muon']
baselines.update({'moe8-M-muon': 'dense-M-muon', 'dense-M-muon': 'dense-M'})
_nanogpt = ['config/train_shakespeare_char.py', '--device=cpu', '--compile=False', '--eval_iters=20',
            '--log_interval=1', '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4',
            '--n_embd=128', '--max_iters=2000', '--lr_decay_iters=2000', '--dropout=0.0']
runs['anchor-dense'] = _nanogpt + ['--n_expert=0']
runs['anchor-moe8'] = _nanogpt + ['--n_expert=8', '--top_k=2', '--expert_hidden=256']
baselines['anchor-moe8'] = 'anchor-dense'
runs.update(_muon)  # last: the anchors matter more than Muon if a study is cut short
