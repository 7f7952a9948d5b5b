# config/train_fineweb_moe.py on one GPU, about an hour on an H100 (RESULTS.md section 12): 983M tokens,
# half the batch (262,144 tokens a step), the same model. Its dense twin: add --n_expert=0
# --out_dir=out-fineweb-dense-1gpu.
# $ python data/fineweb/prepare.py --num_tokens=1B
# $ python train.py config/train_fineweb_moe_1gpu.py
exec(open('config/train_fineweb_moe.py').read())

out_dir = 'out-fineweb-moe-1gpu'
wandb_run_name = 'moe-d12-16x512-top4-1gpu'

gradient_accumulation_steps = 8  # 32 * 1024 * 8 = 262,144 tokens a step
max_iters = 3750  # 983M tokens: inside a 1B preparation
lr_decay_iters = 3750
warmup_iters = 150  # llm.c's share of the steps, 700 of 18,865
eval_interval = 250
hellaswag_interval = 1250  # at steps 0, 1250, 2500 and 3750
