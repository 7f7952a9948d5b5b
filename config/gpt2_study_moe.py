# GPT-2 small with experts in every block, on the gpt2_study.py schedule. Each expert is a full
# GPT-2 MLP (hidden 3072). Default: 8 experts, top-2. The study's other points, from the command line:
# $ torchrun --standalone --nproc_per_node=8 train.py config/gpt2_study_moe.py --n_expert=4 --top_k=1
# --out_dir=out-study-moe4-top1
exec(open('config/gpt2_study.py').read())

wandb_run_name = 'moe'
out_dir = 'out-study-moe'
n_expert = 8
top_k = 2
expert_hidden = 4 * 768
aux_loss_coef = 0.01
z_loss_coef = 0.001
