"""
A nanoMoE model for Hugging Face transformers (trust_remote_code=True), self-contained: export_hf.py copies
this file next to config.json and model.safetensors, and transformers.AutoModelForCausalLM loads it with no
nanoMoE checkout. It computes what moe_model.MoEGPT computes in eval mode (per-token top-k routing, no
noise, jitter or dropout; expert choice routes per token too), with the same parameter names, running the
experts as a loop over experts: simple and exact, not fast. No KV cache: generate() recomputes the context.
"""
import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class NanoMoEConfig(PretrainedConfig):
    model_type = 'nanomoe'
    attribute_map = {'hidden_size': 'n_embd', 'max_position_embeddings': 'block_size', 'num_attention_heads': 'n_head',
                     'num_hidden_layers': 'n_layer'}  # transformers' names for nanoGPT's

    # nanoMoE's keys, with top_k as num_experts_per_tok (transformers reads a config's top_k as a sampling setting)
    def __init__(self, block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=True, n_expert=8,
                 num_experts_per_tok=2, expert_hidden=3072, moe_every=1, router='topk', router_temperature=1.0,
                 n_shared_expert=0, n_dense_layers=0, route_scale=1.0, **kwargs):
        self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd = block_size, vocab_size, n_layer, n_head, n_embd
        self.bias, self.n_expert, self.expert_hidden, self.moe_every = bias, n_expert, expert_hidden, moe_every
        self.num_experts_per_tok = num_experts_per_tok
        self.router, self.router_temperature, self.route_scale = router, router_temperature, route_scale
        self.n_shared_expert, self.n_dense_layers = n_shared_expert, n_dense_layers
        kwargs.setdefault('tie_word_embeddings', True)
        kwargs.setdefault('use_cache', False)
        super().__init__(**kwargs)

    def is_moe_layer(self, i):
        return i >= self.n_dense_layers and (i + 1) % self.moe_every == 0


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config, hidden):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_expert, bias=False) if config.router == 'noisy_topk' else None
        biased = config.router in ('aux_free', 'deepseek_v3')
        self.register_buffer('expert_bias', torch.zeros(config.n_expert) if biased else None)

    def forward(self, x):
        """Top-k experts and their weights per token, in float32 (eval: no noise)."""
        cfg = self.config
        logits = F.linear(x.float(), self.gate.weight.float()) / cfg.router_temperature
        k = cfg.num_experts_per_tok
        if cfg.router == 'deepseek_v3':  # sigmoid scores; the bias selects; the chosen scores, normalised, weigh
            scores = logits.sigmoid()
            topk_idx = (scores + self.expert_bias).topk(k, dim=-1).indices
            weight = scores.gather(-1, topk_idx)
            return topk_idx, (weight / weight.sum(dim=-1, keepdim=True) if k > 1 else weight) * cfg.route_scale
        probs = logits.softmax(dim=-1)
        topk_idx = (probs if self.expert_bias is None else probs + self.expert_bias).topk(k, dim=-1).indices
        if k > 1 and cfg.router != 'expert_choice':  # renormalised over the chosen experts
            return topk_idx, logits.gather(-1, topk_idx).softmax(dim=-1)
        return topk_idx, probs.gather(-1, topk_idx)


class Experts(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, d, h = config.n_expert, config.n_embd, config.expert_hidden
        self.c_fc, self.c_proj = nn.Parameter(torch.empty(E, d, h)), nn.Parameter(torch.empty(E, h, d))
        self.c_fc_bias = nn.Parameter(torch.zeros(E, h)) if config.bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(E, d)) if config.bias else None

    def forward(self, x, e):
        h = x @ self.c_fc[e] + (self.c_fc_bias[e] if self.c_fc_bias is not None else 0)
        return F.gelu(h) @ self.c_proj[e] + (self.c_proj_bias[e] if self.c_proj_bias is not None else 0)


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router, self.experts = Router(config), Experts(config)
        self.shared = MLP(config, config.n_shared_expert * config.expert_hidden) if config.n_shared_expert else None

    def forward(self, x):
        B, T, C = x.shape
        x_flat = x.reshape(B * T, C)
        topk_idx, topk_weight = self.router(x_flat)
        y = torch.zeros(x_flat.shape, dtype=torch.float32, device=x.device)
        for e in range(self.experts.c_fc.size(0)):  # for each expert: its tokens, weighted, added back
            token, slot = torch.where(topk_idx == e)
            y.index_add_(0, token, self.experts(x_flat[token], e).float() * topk_weight[token, slot, None])
        y = y.to(x.dtype).view(B, T, C)
        return y if self.shared is None else y + self.shared(x)


class Block(nn.Module):
    def __init__(self, config, i):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(config.n_embd, config.bias), CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MoE(config) if config.is_moe_layer(i) else MLP(config, 4 * config.n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoMoEConfig
    base_model_prefix = 'transformer'
    _tied_weights_keys = {'lm_head.weight': 'transformer.wte.weight'}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]), ln_f=LayerNorm(config.n_embd, config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):  # the weights come from the checkpoint; fresh ones as nanoMoE draws them
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, Experts):
            nn.init.normal_(module.c_fc, std=0.02)
            nn.init.normal_(module.c_proj, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        T = input_ids.size(1)
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens do not fit the model's block_size={self.config.block_size}")
        x = self.transformer.wte(input_ids) + self.transformer.wpe(torch.arange(T, device=input_ids.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):  # no cache: the whole (cropped) context
        return {'input_ids': input_ids[:, -self.config.block_size:]}


NanoMoEConfig.register_for_auto_class()
NanoMoEForCausalLM.register_for_auto_class('AutoModelForCausalLM')
