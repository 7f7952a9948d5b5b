# evaluate the pretrained OpenAI gpt2-large (774M) on OpenWebText
# $ python train.py config/eval_gpt2_large.py
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
dataset = 'openwebtext'
n_expert = 0
