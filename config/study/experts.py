# dense vs 4/8/16 experts at constant ACTIVE FLOPs on shakespeare_char, small enough for 2 CPU cores:
# every MoE runs top-2 of experts of hidden 2*n_embd, which is the dense MLP's 4*n_embd per token.
# Two seeds of each (init, data order and eval batches all follow the seed), to see the noise.
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/experts.py
title = 'dense vs 4/8/16 experts at constant active FLOPs (shakespeare_char, CPU)'
out_dir = 'out-study-experts'
results = 'assets/study_experts'
_more_evals = ['--eval_interval=100', '--log_interval=25']  # denser curves; evals do not change training
_configs = {
    'dense': ['config/train_shakespeare_char_cpu.py'],
    'moe-4': ['config/train_shakespeare_char_moe_cpu.py', '--n_expert=4'],
    'moe-8': ['config/train_shakespeare_char_moe_cpu.py', '--n_expert=8'],
    'moe-16': ['config/train_shakespeare_char_moe_cpu.py', '--n_expert=16'],
}
runs = {**{name: args + _more_evals for name, args in _configs.items()},
        **{f'{name}-s2': args + _more_evals + ['--seed=1338'] for name, args in _configs.items()}}
