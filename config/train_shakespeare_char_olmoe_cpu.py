# The CPU demo (config/train_shakespeare_char_moe_cpu.py) with OLMoE's modern block: 4 layers, 128 wide,
# 16 SwiGLU experts of 96, top-4 (a token runs a 384-wide SwiGLU MLP, as the dense twin does)
# $ python train.py config/train_shakespeare_char_olmoe_cpu.py
# $ python train.py config/train_shakespeare_char_olmoe_cpu.py --n_expert=0
# --out_dir=out-shakespeare-char-llama-cpu
exec(open('config/train_shakespeare_char_cpu.py').read())
out_dir = 'out-shakespeare-char-olmoe-cpu'
# about 8/3 * n_embd, as SwiGLU models size it (3 matrices instead of GELU's 2 of 4 * n_embd)
mlp_hidden = 384
exec(open('config/olmoe_block.py').read())
