# load-balancing loss weight on the 8-expert top-2 CPU MoE
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/aux.py
title = 'aux_loss_coef 0 / 0.01 / 0.1 (shakespeare_char, CPU)'
out_dir = 'out-study-aux'
results = 'assets/study_aux'
_moe = ['config/train_shakespeare_char_moe_cpu.py', '--eval_interval=100', '--log_interval=25']
runs = {f'aux-{c}': _moe + [f'--aux_loss_coef={c}'] for c in (0.0, 0.01, 0.1)}
