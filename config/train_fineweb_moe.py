# The MoE twin of config/train_fineweb_dense.py (GPT-2 small's shape, the modern block, 10B tokens of
# FineWeb-Edu, one node of 8 GPUs): each block's SwiGLU MLP (768 -> 2048) becomes 16 experts of 512, a
# token going to 4 of them (OLMoE's fine-grained routing, config/olmoe_block.py). A token runs the dense
# MLP's parameters and FLOPs (124M active), the model holds 4x its MLP parameters (294M in all).
# $ python data/fineweb/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_moe.py
exec(open('config/train_fineweb_dense.py').read())

out_dir = 'out-fineweb-moe'
wandb_run_name = 'moe-d12-16x512-top4'

n_expert = 16
top_k = 4
expert_hidden = mlp_hidden // top_k  # 512
router = 'topk'
norm_topk = False  # OLMoE's: the chosen experts' weights are not renormalised
aux_loss_coef = 0.01
z_loss_coef = 0.001
