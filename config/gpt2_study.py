# The GPT-2 MoE study on OpenWebText: every run sees the same data for 10k steps of ~0.5M tokens
# (12 batch * 1024 block * 40 grad accum = 491,520 tokens/step) on 1 node of 8 GPUs.
# This file is the dense GPT-2 small baseline; gpt2_study_moe.py, gpt2_study_medium.py and
# gpt2_study_large.py change only the model. Targets and cost: RESULTS.md. The whole study:
# $ python data/openwebtext/prepare.py --num_proc 8
# $ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_study.py          # dense GPT-2 small
# $ for E in 2 4 8 16; do for K in 1 2; do
#     torchrun --standalone --nproc_per_node=8 train.py config/gpt2_study_moe.py --n_expert=$E --top_k=$K \
#         --out_dir=out-study-moe$E-top$K --wandb_run_name=moe$E-top$K; done; done
# $ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_study_medium.py   # and gpt2_study_large.py
# $ python train.py config/eval_gpt2.py   # pretrained baselines: eval_gpt2{,_medium,_large,_xl}.py

wandb_log = True
wandb_project = 'nanomoe-gpt2-study'
wandb_run_name = 'dense-small'
out_dir = 'out-study-dense-small'

dataset = 'openwebtext'
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 500
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 1e-1

eval_interval = 1000
eval_iters = 200
log_interval = 10

n_layer = 12
n_head = 12
n_embd = 768
n_expert = 0  # dense
