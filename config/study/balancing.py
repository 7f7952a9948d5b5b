# load balancing on the 8-expert MoE (top-2 of experts of hidden 2*n_embd), shakespeare_char, 2 CPU cores:
# the Switch balance loss per micro-batch (topk-aux, the default), the same loss per sequence
# (DeepSeek-V3's sequence-wise loss), and the two loss-free bias routers: aux_free (softmax + bias) and
# deepseek_v3 (sigmoid + re-centred bias). Two seeds; every arm of a seed shares its data and eval batches.
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/balancing.py
title = ('load balancing: balance loss per micro-batch / per sequence, aux_free, deepseek_v3 '
         '(shakespeare_char, CPU)')
out_dir = 'out-study-balancing'
results = 'assets/study_balancing'
_moe = ['config/train_shakespeare_char_moe_cpu.py', '--eval_interval=100', '--log_interval=25']
_arms = {
    'topk-aux': [],
    'topk-seq-aux': ['--aux_loss_scope=sequence'],
    'aux_free': ['--router=aux_free', '--aux_loss_coef=0.0'],
    'deepseek_v3': ['--router=deepseek_v3', '--aux_loss_coef=0.0'],
}
runs = {f'{name}-{seed}': _moe + args + [f'--seed={seed}'] for seed in (1337, 1338)
        for name, args in _arms.items()}
