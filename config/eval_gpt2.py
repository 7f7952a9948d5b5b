# evaluate the pretrained OpenAI gpt2 (124M) on OpenWebText
# $ python train.py config/eval_gpt2.py
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
dataset = 'openwebtext'
n_expert = 0
