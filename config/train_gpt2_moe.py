# GPT-2 small (124M dense backbone) with 8 experts per layer, top-2, on OpenWebText, 1 node of 8 GPUs.
# Each expert is a full GPT-2 MLP (hidden 3072), so a token runs 2 of them: ~2x the dense MLP FLOPs.
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe.py
exec(open('config/train_gpt2.py').read())

wandb_run_name = 'gpt2-124M-moe-8x-top2'
out_dir = 'out-gpt2-moe'

n_expert = 8
top_k = 2
expert_hidden = 4 * 768
moe_every = 1
aux_loss_coef = 0.01
z_loss_coef = 0.001
