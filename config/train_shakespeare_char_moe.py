# the MoE twin of train_shakespeare_char.py: 8 experts, top-2, each expert half the dense MLP's
# hidden size, so a token uses as many parameters (and FLOPs) as in the dense model
exec(open('config/train_shakespeare_char.py').read())

out_dir = 'out-shakespeare-char-moe'
wandb_run_name = 'mini-moe'
n_expert = 8
top_k = 2
expert_hidden = 2 * n_embd  # top_k * expert_hidden = 4 * n_embd, the dense MLP's hidden size
