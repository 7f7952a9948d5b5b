# GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 tokens of context, tied embeddings: 124M
# parameters) with the modern block, on 10B tokens of FineWeb-Edu, one node of 8 GPUs: the dense twin of
# config/train_fineweb_moe.py, and the model to set against llm.c's GPT-2 (124M) (targets and cost:
# RESULTS.md section 12; llm.c's val loss is on FineWeb: prepare with --corpus=fineweb to compare it).
# $ python data/fineweb/prepare.py        # 10M val + 10B train tokens into data/fineweb/
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_dense.py
# (MFU is printed against the GPU's own bf16 peak, model.peak_flops: 989 TFLOP/s on an H100 SXM)

out_dir = 'out-fineweb-dense'
wandb_project = 'nanomoe-fineweb'  # with --wandb_log=True
wandb_run_name = 'dense-d12'

dataset = 'fineweb'
# llm.c's batch: 32 sequences of 1024 tokens, 2 micro-steps on each of 8 GPUs = 524,288 tokens a step
# (on 40 GB cards: batch_size = 16 and twice the micro-steps)
batch_size = 32
block_size = 1024
gradient_accumulation_steps = 2 * 8

# llm.c's schedule (scripts/run_gpt2_124M.sh: 18,865 steps, peak 6e-4 after 700 steps, decayed to 0, weight
# decay 0.1), 19,000 steps long: 9.96B tokens, and a last step that HellaSwag's interval lands on
max_iters = 19000
lr_decay_iters = 19000
warmup_iters = 700
learning_rate = 6e-4
min_lr = 0.0
weight_decay = 0.1

eval_interval = 500
eval_iters = 50  # 50 * 32 * 1024 = 1.6M val tokens an eval
log_interval = 10
hellaswag_interval = 9500  # HellaSwag's 10,042 examples at steps 0, 9500 and 19,000 (a minute or two each)
hellaswag_examples = 0

n_layer = 12
n_head = 12
n_embd = 768
# the modern block (README, "The modern block"): OLMoE's (config/olmoe_block.py) but with GPT-2's tied
# embeddings, which keep the parameters at GPT-2's 124M (an untied head adds 39M)
norm = 'rmsnorm'
rope = True
mlp = 'swiglu'
mlp_hidden = 2048  # 3 matrices of 768 x 2048 = GPT-2's 2 of 768 x 3072: its parameters and FLOPs
qk_norm = 'full'
bias = False
tie_embeddings = True
n_expert = 0  # dense
