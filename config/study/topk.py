# top-1 vs top-2 at constant active FLOPs: one expert of 4*n_embd or two of 2*n_embd per token
# $ OMP_NUM_THREADS=2 python tools/study.py config/study/topk.py
title = 'top-1 vs top-2 at constant active FLOPs, 8 experts (shakespeare_char, CPU)'
out_dir = 'out-study-topk'
results = 'assets/study_topk'
_moe = ['config/train_shakespeare_char_moe_cpu.py', '--eval_interval=100', '--log_interval=25']
runs = {
    'top1-h512': _moe + ['--top_k=1', '--expert_hidden=512'],
    'top2-h256': _moe + ['--top_k=2', '--expert_hidden=256'],
}
