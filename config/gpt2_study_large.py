# dense GPT-2 large (774M) on the gpt2_study.py schedule (smaller micro-batch, same tokens per step)
exec(open('config/gpt2_study.py').read())

wandb_run_name = 'dense-large'
out_dir = 'out-study-dense-large'
n_layer = 36
n_head = 20
n_embd = 1280
batch_size = 6
gradient_accumulation_steps = 10 * 8
