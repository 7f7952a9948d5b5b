# evaluate the pretrained OpenAI gpt2-medium (350M) on OpenWebText
# $ python train.py config/eval_gpt2_medium.py
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
dataset = 'openwebtext'
n_expert = 0
