# sparse upcycling (upcycle.py) on shakespeare_char, small enough for 2 CPU cores. A dense model trains 1000
# steps; then, for 500 more steps, it continues as it is (dense-cont) or as an MoE upcycled from it
# (upcycled: 8 experts, each a half of the dense MLP, top-2: the dense model's active FLOPs). The same MoE
# trained from scratch gets all 1500 steps (scratch-moe). Every arm of a seed shares the seed, so the same
# eval batches (the continuations restart the data order: they see steps 0-499's batches again, with a
# fresh warmup and cosine schedule). Two seeds.
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/upcycle.py
title = ('sparse upcycling: dense 1000 steps + 500 dense / upcycled MoE, vs an MoE from scratch for 1500 '
         '(shakespeare_char, CPU)')
out_dir = 'out-study-upcycle'
results = 'assets/study_upcycle'
_more_evals = ['--eval_interval=100', '--log_interval=25']  # denser curves; evals do not change training
_then = ['--max_iters=500', '--lr_decay_iters=500', '--warmup_iters=50']
runs = {}
for _seed in (1337, 1338):
    _dense = ['config/train_shakespeare_char_cpu.py', *_more_evals, f'--seed={_seed}']
    _pretrained = f'--init_from={out_dir}/dense-{_seed}/ckpt.pt'  # ckpt.pt: the last eval, at step 1000
    runs[f'dense-{_seed}'] = _dense
    runs[f'dense-cont-{_seed}'] = _dense + [_pretrained, *_then]
    runs[f'upcycled-{_seed}'] = _dense + [_pretrained, *_then, '--n_expert=8', '--expert_hidden=256']
    runs[f'scratch-moe-{_seed}'] = ['config/train_shakespeare_char_moe_cpu.py', *_more_evals,
                                    f'--seed={_seed}', '--max_iters=1500', '--lr_decay_iters=1500']
