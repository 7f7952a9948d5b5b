"""
A dense GPT-2 in one file, as in nanoGPT.
References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py

Departures from nanoGPT's model.py:
- hooks for moe_model.MoEGPT, no-ops here: make_mlp(layer_idx) builds each block's feed-forward layer (so
  MoEGPT swaps MLPs for experts without copying the constructor or forward), aux_loss(), routing_stats(),
  probe_routing(), diagnose(), end_step(); get_num_params(active=True), and MFU from active parameters;
- the loss is the cross-entropy plus aux_loss() in training, the cross-entropy alone in eval, with its parts
  in model.loss_terms;
- generate() keeps a KV cache (the same tokens as recomputing, faster);
- GPTConfig checks its values (one clear ValueError) and says what each key is (key() below); MLP takes a
  hidden size (shared experts);
- activation checkpointing (set_activation_checkpointing), off by default;
- from_pretrained (hf.load_gpt2) also takes a local folder; configure_optimizers uses fused AdamW on CPU too
  and tells stacked expert biases apart from weights by name.
"""

import math
import inspect
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F


KINDS = ('shape', 'forward', 'train')


def key(default, kind):
    """A model key, declared once in a config dataclass with its default and its kind, from which every list
    of keys is derived (checkpoints, resume, train.py, bench.py, the Hugging Face export, README's table):
      'shape'    the weights' names or shapes depend on it: fixed once a model has weights
      'forward'  what the model computes, not its weights: exported; a resumed run may change it, and says so
      'train'    how the model trains or which backend runs it: the run's own, never exported"""
    assert kind in KINDS
    return field(default=default, metadata={'kind': kind})


def keys_of(config_class, *kinds):
    """The names of config_class's model keys of these kinds (all kinds if none are named), in order."""
    return tuple(f.name for f in fields(config_class) if not kinds or f.metadata['kind'] in kinds)


@dataclass
class GPTConfig:
    block_size: int = key(1024, 'shape')
    # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    vocab_size: int = key(50304, 'shape')
    n_layer: int = key(12, 'shape')
    n_head: int = key(12, 'forward')
    n_embd: int = key(768, 'shape')
    dropout: float = key(0.0, 'train')
    # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    bias: bool = key(True, 'shape')
    # the block: GPT-2's by default; the modern one (Llama,
    # Mixtral, OLMoE, Qwen3) is rmsnorm, rope, swiglu, qk_norm
    norm: str = key('layernorm', 'shape')    # 'layernorm' (GPT-2) or 'rmsnorm'
    norm_eps: float = key(1e-5, 'forward')
    rope: bool = key(False, 'shape')         # rotary positions (the rotate-half form) instead of learned ones
    rope_theta: float = key(10000.0, 'forward')
    # the MLP and every expert: 'gelu' (GPT-2) or 'swiglu' (gate, up, down)
    mlp: str = key('gelu', 'shape')
    mlp_hidden: int = key(0, 'shape')        # the dense MLP's hidden size; 0 means 4 * n_embd
    # RMSNorm on q and k: 'none', each 'head' (Qwen3), or 'full' (OLMoE)
    qk_norm: str = key('none', 'shape')
    n_kv_head: int = key(0, 'shape')         # key/value heads (grouped-query attention); 0 means n_head
    head_dim: int = key(0, 'shape')          # each head's size; 0 means n_embd // n_head (Qwen3: often wider)
    tie_embeddings: bool = key(True, 'shape')  # the language-model head is the token embedding (GPT-2)

    def __post_init__(self):
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.head_dim and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             "(or set head_dim)")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'mlp_hidden', 'n_kv_head',
                    'head_dim'):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)!r} must be a positive integer")
        if self.n_head % self.n_kv_head or self.rope and self.head_dim % 2:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"
                             if self.n_head % self.n_kv_head
                             else f"rope needs an even head size, not head_dim = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for key, allowed in (('norm', ('layernorm', 'rmsnorm')), ('mlp', ('gelu', 'swiglu')),
                             ('qk_norm', ('none', 'head', 'full'))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is unknown; allowed: {', '.join(allowed)}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be > 0")


class LayerNorm(nn.Module):
    """ LayerNorm but with an optional bias (PyTorch doesn't support simply bias=False), or RMSNorm """

    def __init__(self, ndim, bias, eps=1e-5, rms=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and not rms else None
        self.eps, self.rms = eps, rms

    def forward(self, input):
        if self.rms:  # in float32, as Llama's and its descendants' RMSNorm
            return F.rms_norm(input.float(), self.weight.shape, eps=self.eps).to(input.dtype) * self.weight
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, self.eps)


def norm(config, ndim=None):
    """The block's normalisation over ndim (default n_embd) features: config.norm, with config.norm_eps."""
    return LayerNorm(ndim or config.n_embd, config.bias, config.norm_eps, config.norm == 'rmsnorm')


def rope_cos_sin(positions, head_size, theta):
    """Rotary embeddings' cos and sin [t, head_size] at these positions, in float32 (the rotate-half form)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32,
                                            device=positions.device) / head_size)
    angles = torch.outer(positions.float(), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [..., t, head_size] rotated: each pair (x_i, x_{i + head_size / 2}) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_dim
        # key, query, value projections for all heads, but in a batch (n_kv_head key and value heads)
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.hs, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(self.n_head * self.hs, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm  # RMSNorm of each head's q and k (Qwen3) or of all of q and k (OLMoE)
        if self.qk_norm != 'none':
            rms = dict(config=replace(config, norm='rmsnorm'))
            self.q_norm = norm(**rms, ndim=self.hs if self.qk_norm == 'head' else self.n_head * self.hs)
            self.k_norm = norm(**rms, ndim=self.hs if self.qk_norm == 'head' else self.n_kv_head * self.hs)

    def forward(self, x, kv_cache=None, rope=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv_head * self.hs,
                                        self.n_kv_head * self.hs], dim=2)
        if self.qk_norm == 'full':
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.hs)
        k, v = k.view(B, T, self.n_kv_head, self.hs), v.view(B, T, self.n_kv_head, self.hs)
        if self.qk_norm == 'head':
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:  # (cos, sin) of this forward's positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # kv_cache (generation only) is a dict holding this layer's past keys and values
        if kv_cache is not None:
            if 'k' in kv_cache:
                k = torch.cat([kv_cache['k'], k], dim=2)
                v = torch.cat([kv_cache['v'], v], dim=2)
            kv_cache['k'], kv_cache['v'] = k, v
        # a single new query attends to every cached key; otherwise the usual causal mask
        # (generate() only ever appends one token at a time to a non-empty cache)
        is_causal = q.size(2) == k.size(2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=is_causal,
                                           dropout_p=self.attn_dropout_p if self.training else 0,
                                           **({'enable_gqa': True} if self.n_kv_head != self.n_head else {}))
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)  # all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


def activation(h, mlp):
    """The MLP's (and every expert's) nonlinearity on c_fc's output h: GELU, or SwiGLU, where h holds the
    gate and the up projection side by side: silu(gate) * up (so swiglu's c_fc is twice as wide)."""
    if mlp == 'swiglu':
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class MLP(nn.Module):

    def __init__(self, config, hidden=None):
        super().__init__()
        hidden = hidden or config.mlp_hidden  # MoE shared experts pass their own hidden size
        self.mlp = config.mlp
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if self.mlp == 'swiglu' else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(activation(self.c_fc(x), self.mlp)))


def checkpointed(fn, *args):
    """fn(*args), with its activations recomputed in backward instead of kept (activation checkpointing:
    non-reentrant torch.utils.checkpoint, which replays the RNG, so dropout draws the same masks)."""
    if not torch.is_grad_enabled():  # no backward to come: nothing to save
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class Block(nn.Module):

    def __init__(self, config, mlp):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = mlp
        # recompute in backward (set_activation_checkpointing): None, 'block' or 'attn'
        self.checkpoint = None

    def forward(self, x, kv_cache=None, rope=None):
        if self.checkpoint == 'block' and kv_cache is None:
            return checkpointed(self.sublayers, x, None, rope)
        return self.sublayers(x, kv_cache, rope)

    def sublayers(self, x, kv_cache=None, rope=None):
        attn = lambda x: self.attn(self.ln_1(x), kv_cache, rope)
        x = x + (checkpointed(attn, x) if self.checkpoint == 'attn' else attn(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def peak_flops(name):
    """bf16 dense peak FLOP/s of the GPU named `name`, for MFU (GPT.estimate_mfu): H100 PCIe (and H800 PCIe)
    756 TFLOP/s, H100 NVL 835, H100 SXM, H200, H800, GH200 989; otherwise A100's 312."""
    if any(gpu in name for gpu in ('H100', 'H200', 'H800')):
        return 756e12 if 'PCIe' in name else 835e12 if 'NVL' in name else 989e12
    return 312e12


CHECKPOINTING = ('none', 'moe', 'all')  # activation_checkpointing modes (GPT.set_activation_checkpointing)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if config.rope else {'wpe': nn.Embedding(config.block_size, config.n_embd)}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.make_mlp(i)) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # with weight tying when using torch.compile() some warnings get generated:
            # "UserWarning: functional_call was passed multiple values for tied weights.
            # This behavior is deprecated and will be an error in future versions"
            # not 100% sure what this is, so far seems to be harmless. TODO investigate
            # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.loss_terms = {}  # the parts of the last loss, for logging

    def make_mlp(self, layer_idx):
        """The feed-forward layer of block `layer_idx` (MoEGPT overrides this)."""
        return MLP(self.config)

    def aux_loss(self):
        """Extra training loss added to the cross-entropy after a forward (MoEGPT overrides this)."""
        return 0.0

    def routing_stats(self):
        """Per-layer routing statistics after a forward, for logging (MoEGPT overrides this)."""
        return {}

    def probe_routing(self, idx):
        """Per-layer routing on a fixed probe batch: flip rate, dead experts (MoEGPT overrides this)."""
        return {}

    def diagnose(self, idx):
        """Per-layer state for the divergence guard's post-mortem, re-run on idx (MoEGPT overrides this)."""
        return {}

    def end_step(self, skipped=False):
        """Called once per optimizer step, after the last micro-batch; skipped: the step was not taken
        (MoEGPT overrides this)."""
        pass

    def set_activation_checkpointing(self, mode):
        """Trade compute for memory: 'none'; 'moe' (the MoE layers' experts recompute their activations in
        backward: nothing in a dense model); 'all' (every block recomputes; MoEGPT says how for MoE
        blocks)."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={mode!r} is unknown; allowed: "
                             f"{', '.join(CHECKPOINTING)}")
        for block in self.transformer.h:
            block.checkpoint = 'block' if mode == 'all' else None

    def get_num_params(self, non_embedding=True, active=False):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        active=True counts only the parameters one token uses (the same for a dense model).
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rope:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_caches=None):
        x = self.hidden(idx, kv_caches)
        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            # a new dict, not an item set in the old one: torch.compile would guard on the old one being empty
            # and compile the step twice
            self.loss_terms = {'ce': ce.detach()}
            aux = self.aux_loss()
            # auxiliary losses shape training only: evaluation reports the cross-entropy alone
            loss = ce + aux if self.training else ce
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def hidden(self, idx, kv_caches=None):
        """The last layer's normalised output [b, t, n_embd], before the language-model head."""
        device = idx.device
        b, t = idx.size()
        past = kv_caches[0]['k'].size(2) if kv_caches and 'k' in kv_caches[0] else 0
        assert past + t <= self.config.block_size, \
            f"Cannot forward sequence of length {past + t}, block size is only {self.config.block_size}"
        pos = torch.arange(past, past + t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        x = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        if self.config.rope:  # positions rotate each head's q and k instead
            rope = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        else:
            rope, x = None, x + self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None, rope)
        return self.transformer.ln_f(x)

    def crop_block_size(self, block_size):
        # model surgery to decrease the block size if necessary
        # e.g. we may load the GPT2 pretrained model checkpoint (block size 1024)
        # but want to use a smaller block size for some smaller, simpler model
        if block_size > self.config.block_size:
            raise ValueError(f"block_size={block_size} is larger than the model's "
                             f"block_size={self.config.block_size}")
        self.config.block_size = block_size
        if not self.config.rope:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """GPT-2's weights from Hugging Face: model_type is 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', or
        a local folder holding a GPT2LMHeadModel (save_pretrained); override_args may set dropout
        (hf.load_gpt2)."""
        from hf import load_gpt2
        return load_gpt2(model_type, **(override_args or {}))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # start with all of the candidate parameters that require grad
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        # create optim groups. Any parameter that is 2D+ will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        # (stacked expert biases are 2D, so biases are told apart by name)
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2 and not n.endswith('bias')]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2 or n.endswith('bias')]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0}
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, "
              f"with {num_nodecay_params:,} parameters")
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type in ('cuda', 'cpu')  # on CPU too: ~4x faster than foreach
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """ estimate model flops utilization (MFU) in units of peak_flops (default: A100 bf16 peak) """
        # first estimate the number of flops we do per iteration.
        # see PaLM paper Appendix B as ref: https://arxiv.org/abs/2204.02311
        # an MoE only runs its ACTIVE parameters on a token, so those are what cost FLOPs
        N = self.get_num_params(active=True)
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_fwdbwd = flops_per_token * T
        flops_per_iter = flops_per_fwdbwd * fwdbwd_per_iter
        # express our flops throughput as ratio of the peak flops
        flops_achieved = flops_per_iter * (1.0 / dt)  # per second
        return flops_achieved / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_kv_cache=True):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        With use_kv_cache the keys and values of past tokens are kept instead of recomputed; once the
        context fills block_size the cache restarts from the cropped context, so both ways give the
        same tokens. Most likely you'll want to make sure to be in model.eval() mode of operation for this.
        """
        kv_caches = None
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            full = idx.size(1) > self.config.block_size
            idx_cond = idx if not full else idx[:, -self.config.block_size:]
            if not use_kv_cache:
                logits, _ = self(idx_cond)
            elif kv_caches is None or full:
                kv_caches = [{} for _ in self.transformer.h]  # (re)fill the cache from the whole context
                logits, _ = self(idx_cond, kv_caches=kv_caches)
            else:
                logits, _ = self(idx[:, -1:], kv_caches=kv_caches)  # only the newest token
            # pluck the logits at the final step and scale by desired temperature; in float64 and less their
            # max (softmax ignores it), so that a tiny temperature is greedy sampling, never inf - inf = NaN
            logits = logits[:, -1, :].double()
            logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
            # optionally crop the logits to only the top k options
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            # apply softmax to convert logits to (normalized) probabilities
            probs = F.softmax(logits, dim=-1)
            # sample from the distribution
            idx_next = torch.multinomial(probs, num_samples=1)
            # append sampled index to the running sequence and continue
            idx = torch.cat((idx, idx_next), dim=1)

        return idx
