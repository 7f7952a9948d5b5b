# OLMoE's block (OLMoE-1B-7B; transformers' OlmoeForCausalLM): RMSNorm, rotary positions, SwiGLU MLP and
# experts, RMSNorm over the whole q and k projections, no biases, an untied head, and a softmax top-k router
# whose chosen weights are not renormalised. Fine-grained experts: top_k experts of mlp_hidden / top_k each,
# so a token runs the dense MLP's FLOPs. Set n_embd and mlp_hidden before exec-ing this file.
norm = 'rmsnorm'
rope = True
mlp = 'swiglu'
qk_norm = 'full'
bias = False
tie_embeddings = False
router = 'topk'
norm_topk = False
n_expert = 16
top_k = 4
expert_hidden = mlp_hidden // top_k
