# dense GPT-2 medium (350M) on the gpt2_study.py schedule
exec(open('config/gpt2_study.py').read())

wandb_run_name = 'dense-medium'
out_dir = 'out-study-dense-medium'
n_layer = 24
n_head = 16
n_embd = 1024
