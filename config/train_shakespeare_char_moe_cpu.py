# the MoE twin of train_shakespeare_char_cpu.py, at the same ACTIVE parameter count:
# 8 experts of hidden 2*n_embd, top-2, against the dense MLP's hidden 4*n_embd
# $ python train.py config/train_shakespeare_char_moe_cpu.py
exec(open('config/train_shakespeare_char_cpu.py').read())

out_dir = 'out-shakespeare-char-moe-cpu'
n_expert = 8
top_k = 2
expert_hidden = 2 * n_embd
