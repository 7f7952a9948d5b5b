# A GPU run of OLMoE's modern block on shakespeare_char, at about 10M active parameters (nanoGPT's dense
# baby GPT has 10.7M and reaches val loss 1.4697): 6 layers, 384 wide, 16 SwiGLU experts of 256, top-4
# $ python train.py config/train_shakespeare_char_olmoe.py
exec(open('config/train_shakespeare_char.py').read())
out_dir = 'out-shakespeare-char-olmoe'
wandb_run_name = 'mini-olmoe'
mlp_hidden = 1024  # about 8/3 * n_embd: a token runs a 1024-wide SwiGLU MLP
exec(open('config/olmoe_block.py').read())
