# router variants on the 8-expert top-2 CPU MoE (config/train_shakespeare_char_moe_cpu.py)
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/routers.py
title = 'routers: top-k vs noisy top-k vs expert choice vs aux-loss-free (shakespeare_char, CPU)'
out_dir = 'out-study-routers'
results = 'assets/study_routers'
_moe = ['config/train_shakespeare_char_moe_cpu.py', '--eval_interval=100', '--log_interval=25']
runs = {
    'topk': _moe,
    'noisy_topk': _moe + ['--router=noisy_topk'],
    'expert_choice': _moe + ['--router=expert_choice'],
    'aux_free': _moe + ['--router=aux_free', '--aux_loss_coef=0.0'],  # the bias alone balances
}
