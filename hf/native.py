"""
transformers' own classes, both ways, with no trust_remote_code: a model of this repo exported as the class
that computes exactly it (Mixtral, Qwen3-MoE, OLMoE; Llama, Qwen3; GPT-2), and a folder of one of those
classes loaded as this repo's model. NATIVE is the one table both directions read: per class, which config
field holds which model key, and what the class fixes (on our side: keys; on its side: config fields). So
export picks a class by matching every exported key against it, and import refuses, with one line naming the
field, a folder whose config asks for something this repo does not compute (sliding windows, rope scaling,
attention biases without MLP ones, another activation, an unknown field, ...).

Weights go through transformers' in-memory layout (5.x: every layer's experts stacked, gate_up_proj
[E, 2 * inter, d], down_proj [E, d, inter]); transformers itself converts that from and to the files'
per-expert layout, so folders from its other 5.x versions and from the Hub load alike.
"""
from typing import Callable, NamedTuple

import torch


class Field(NamedTuple):
    """A config field whose value is not one key's value as it is: to_hf(config) -> the field's value;
    to_ours(value, hf_config) -> {key: value} (ValueError, through refuse, where no value of ours fits);
    keys: the model keys it carries."""
    keys: tuple
    to_hf: Callable
    to_ours: Callable


class Native(NamedTuple):
    model_type: str
    moe: bool
    fields: dict        # config field: the model key it holds (the same value), or a Field
    keys: dict          # model keys the class fixes: their value, or a function of the config giving it
    fixed: dict = {}    # config fields it reads that must hold these values (export writes, import checks)
    unused: tuple = ()  # model keys it needs no value of: every value computes the same
    ignored: tuple = ()  # its config fields that change nothing computed here (training only, or off)
    loads: dict = {}    # model keys an imported folder gets besides: the class's own, where no field says


def refuse(field, value, why):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + '...'
    raise ValueError(f"config.json has {field}={shown}: {why}; this repo cannot compute that exactly")


def _rope(value, hf):
    """rope_parameters: the plain rotary embedding (transformers folds older configs' rope_theta,
    rope_scaling and partial_rotary_factor into it)."""
    value = dict(value or {})
    if value.get('rope_type', 'default') != 'default':
        refuse('rope_parameters.rope_type', value['rope_type'], "a scaled rotary embedding")
    for k in value:
        if k not in ('rope_type', 'rope_theta'):
            refuse(f'rope_parameters.{k}', value[k], "a rotary embedding other than the plain one")
    return {'rope_theta': float(value.get('rope_theta', 10000.0))}


def _head_dim(value, hf):
    """head_dim: None (absent) is hidden_size // num_attention_heads, as in transformers."""
    return {'head_dim': value or hf.hidden_size // hf.num_attention_heads}


def _full_attention(value, hf):
    for t in value or ():
        if t != 'full_attention':
            refuse('layer_types', value, f"{t!r} layers")
    return {}


def _mlp_only_layers(value, hf):
    """Qwen3-MoE's MoE layers are those (i + 1) % decoder_sparse_step == 0 not in mlp_only_layers; here those
    (i + 1) % moe_every == 0 from n_dense_layers on: the smallest n_dense_layers that picks the same ones."""
    n, step = hf.num_hidden_layers, hf.decoder_sparse_step
    theirs = [i for i in range(n) if i not in (value or ()) and (i + 1) % step == 0]
    for n_dense in range(n + 1):
        if [i for i in range(n_dense, n) if (i + 1) % step == 0] == theirs:
            return {'n_dense_layers': n_dense}
    refuse('mlp_only_layers', value, f"MoE layers {theirs}, not every decoder_sparse_step={step}-th layer "
                                     f"from one layer on")


def _norm_topk_prob(value, hf):
    """norm_topk_prob: at top_k = 1 too (weight 1.0: norm_top1), as transformers renormalises."""
    return {'norm_topk': bool(value), 'norm_top1': bool(value) and hf.num_experts_per_tok == 1}


ROPE = Field(('rope_theta',), lambda c: {'rope_type': 'default', 'rope_theta': c.rope_theta}, _rope)
HEAD_DIM = Field(('head_dim',), lambda c: c.head_dim, _head_dim)
FULL_ATTENTION = Field((), lambda c: None, _full_attention)  # (None: all 'full_attention' in transformers)
DENSE_LAYERS = Field(('n_dense_layers',), lambda c: list(range(c.n_dense_layers)), _mlp_only_layers)
NORM_TOPK = Field(('norm_topk', 'norm_top1'), lambda c: c.renormalises(), _norm_topk_prob)
# Mixtral renormalises at any top_k (its top-1 weight is 1.0)
MIXTRAL_TOP_K = Field(('top_k', 'norm_top1'), lambda c: c.top_k,
                      lambda v, hf: {'top_k': v, 'norm_top1': v == 1})

# the modern block: every field and key Llama, Mixtral, OLMoE and the Qwen3 share
MODERN = {'vocab_size': 'vocab_size', 'hidden_size': 'n_embd', 'num_hidden_layers': 'n_layer',
          'num_attention_heads': 'n_head', 'num_key_value_heads': 'n_kv_head', 'head_dim': HEAD_DIM,
          'max_position_embeddings': 'block_size', 'rms_norm_eps': 'norm_eps', 'rope_parameters': ROPE,
          'tie_word_embeddings': 'tie_embeddings'}
MODERN_KEYS = {'norm': 'rmsnorm', 'rope': True, 'mlp': 'swiglu'}
SILU = {'hidden_act': 'silu'}  # silu(gate) * up: SwiGLU
# the softmax top-k router of all three MoE classes, with no shared expert and no expert biases
TOPK = {'router_score': 'softmax', 'router_bias': False, 'router_noise': False, 'router_temperature': 1.0,
        'route_scale': 1.0, 'n_shared_expert': 0, 'bias': False}
NO_SLIDING = {'use_sliding_window': False, 'sliding_window': None}

NATIVE = {
    'MixtralForCausalLM': Native(
        'mixtral', True,
        {**MODERN, 'intermediate_size': 'expert_hidden', 'num_local_experts': 'n_expert',
         'num_experts_per_tok': MIXTRAL_TOP_K},
        {**MODERN_KEYS, **TOPK, 'qk_norm': 'none', 'moe_every': 1, 'n_dense_layers': 0, 'norm_topk': True},
        fixed={**SILU, 'sliding_window': None}, unused=('mlp_hidden', 'router'),
        ignored=('router_jitter_noise',), loads={'router': 'topk'}),
    'Qwen3MoeForCausalLM': Native(
        'qwen3_moe', True,
        {**MODERN, 'intermediate_size': 'mlp_hidden', 'moe_intermediate_size': 'expert_hidden',
         'num_experts': 'n_expert', 'num_experts_per_tok': 'top_k', 'norm_topk_prob': NORM_TOPK,
         'decoder_sparse_step': 'moe_every', 'mlp_only_layers': DENSE_LAYERS},
        {**MODERN_KEYS, **TOPK, 'qk_norm': 'head'},
        fixed={**SILU, 'attention_bias': False, **NO_SLIDING}, unused=('router',),
        ignored=('max_window_layers',), loads={'router': 'topk'}),
    'OlmoeForCausalLM': Native(
        'olmoe', True,
        {**MODERN, 'intermediate_size': 'expert_hidden', 'num_experts': 'n_expert',
         'num_experts_per_tok': 'top_k', 'norm_topk_prob': NORM_TOPK},
        {**MODERN_KEYS, **TOPK, 'qk_norm': 'full', 'moe_every': 1, 'n_dense_layers': 0},
        fixed={**SILU, 'attention_bias': False, 'clip_qkv': None}, unused=('mlp_hidden', 'router'),
        loads={'router': 'topk'}),
    'LlamaForCausalLM': Native(
        'llama', False,
        {**MODERN, 'intermediate_size': 'mlp_hidden', 'attention_bias': 'bias', 'mlp_bias': 'bias'},
        {**MODERN_KEYS, 'qk_norm': 'none'},
        fixed=SILU, ignored=('pretraining_tp',), loads={'n_expert': 0}),
    'Qwen3ForCausalLM': Native(
        'qwen3', False,
        {**MODERN, 'intermediate_size': 'mlp_hidden', 'layer_types': FULL_ATTENTION},
        {**MODERN_KEYS, 'qk_norm': 'head', 'bias': False},
        fixed={**SILU, 'attention_bias': False, **NO_SLIDING}, ignored=('max_window_layers',),
        loads={'n_expert': 0}),
    # GPT-2's block: exported with zero biases where the model has none; its folders load as in nanoGPT
    # (hf.load_gpt2: GPT-2's own 'gelu_new' is read as nanoGPT's exact GELU)
    'GPT2LMHeadModel': Native(
        'gpt2', False,
        {'vocab_size': 'vocab_size', 'n_positions': 'block_size', 'n_embd': 'n_embd', 'n_layer': 'n_layer',
         'n_head': 'n_head', 'n_inner': 'mlp_hidden', 'layer_norm_epsilon': 'norm_eps'},
        {'norm': 'layernorm', 'rope': False, 'mlp': 'gelu', 'qk_norm': 'none',
         'n_kv_head': lambda c: c.n_head, 'head_dim': lambda c: c.n_embd // c.n_head, 'tie_embeddings': True},
        fixed={'activation_function': 'gelu'}, unused=('bias', 'rope_theta'),
        loads={'bias': True, 'n_expert': 0}),
}
# written on export, for every class: no special tokens (a tokenizer's come with it), no dropout
EXPORT_ONLY = {'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': None}
GPT2_EXPORT_ONLY = {'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0}
# config fields that change nothing this repo computes in any class: transformers' generic ones, the special
# tokens, training-only settings (dropout, the aux loss: the run's own here), pretraining's init; and those
# that transformers folds into rope_parameters (checked there)
IGNORED = ('_name_or_path', 'architectures', 'chunk_size_feed_forward', 'dtype', 'torch_dtype', 'id2label',
           'label2id', 'is_encoder_decoder', 'model_type', 'output_attentions', 'output_hidden_states',
           'problem_type', 'return_dict', 'transformers_version', 'use_cache', 'bos_token_id', 'eos_token_id',
           'pad_token_id', 'initializer_range', 'attention_dropout', 'output_router_logits',
           'router_aux_loss_coef', 'rope_theta', 'rope_scaling', 'partial_rotary_factor')


def covered(native):
    """The model keys a class's row says something about (every exported key must be one: tests check)."""
    keys = set(native.keys) | set(native.unused)
    for key in native.fields.values():
        keys |= set(key.keys) if isinstance(key, Field) else {key}
    return keys


def key_value(config, key):
    """A model key's value as the classes see it: norm_topk renormalises at top_k = 1 only with norm_top1
    (Router), else a top-1 model with norm_topk computes what one without does."""
    if key == 'norm_topk':
        return config.renormalises()
    return getattr(config, key)


def mismatch(native, config):
    """The first key whose value the class cannot compute, as 'key=wanted (this model: value)', or None."""
    for key, want in native.keys.items():
        want = want(config) if callable(want) else want
        if key_value(config, key) != want:
            return f"{key}={want!r} (this model: {key_value(config, key)!r})"
    return None


def choose(config):
    """(class name, why): the transformers class that computes exactly this model, or None, and why none."""
    moe, misses = getattr(config, 'n_expert', 0) > 0, []
    for name, native in NATIVE.items():
        if native.moe == moe:
            miss = mismatch(native, config)
            if miss is None:
                block = 'GPT-2' if native.model_type == 'gpt2' else 'its'
                return name, f"{block} block and every key map onto it"
            misses.append(f"{name} needs {miss}")
    return None, '; '.join(misses)


def hf_kwargs(name, config):
    """The transformers config fields of class name for a model config (a class that choose() picked)."""
    native = NATIVE[name]
    kwargs = {**EXPORT_ONLY, **(GPT2_EXPORT_ONLY if native.model_type == 'gpt2' else {}), **native.fixed}
    for field, key in native.fields.items():
        kwargs[field] = key.to_hf(config) if isinstance(key, Field) else key_value(config, key)
    return kwargs


def weight_names(config):
    """[(our name, its transformers names, how)]: how is 'same' (the tensor), 'cat' (ours is theirs
    concatenated on dim 0: the fused q | k | v, gate | up) or 'T' (ours is theirs with the last two dims
    swapped: the stacked experts, which we apply as x @ W and transformers as x @ W.T). The modern classes
    only (GPT-2: hf.load_gpt2, hf.export_dense)."""
    rules = [('transformer.wte.weight', ['model.embed_tokens.weight'], 'same'),
             ('transformer.ln_f.weight', ['model.norm.weight'], 'same'),
             ('lm_head.weight', ['lm_head.weight'], 'same')]
    params = ('weight', 'bias') if config.bias else ('weight',)
    for i in range(config.n_layer):
        ours, theirs = f'transformer.h.{i}.', f'model.layers.{i}.'
        rules += [(ours + 'ln_1.weight', [theirs + 'input_layernorm.weight'], 'same'),
                  (ours + 'ln_2.weight', [theirs + 'post_attention_layernorm.weight'], 'same')]
        for p in params:
            rules += [(ours + f'attn.c_attn.{p}', [theirs + f'self_attn.{x}_proj.{p}' for x in 'qkv'], 'cat'),
                      (ours + f'attn.c_proj.{p}', [theirs + f'self_attn.o_proj.{p}'], 'same')]
        if config.qk_norm != 'none':
            rules += [(ours + f'attn.{x}_norm.weight', [theirs + f'self_attn.{x}_norm.weight'], 'same')
                      for x in 'qk']
        if getattr(config, 'n_expert', 0) and config.is_moe_layer(i):
            rules += [(ours + 'mlp.router.gate.weight', [theirs + 'mlp.gate.weight'], 'same'),
                      (ours + 'mlp.experts.c_fc', [theirs + 'mlp.experts.gate_up_proj'], 'T'),
                      (ours + 'mlp.experts.c_proj', [theirs + 'mlp.experts.down_proj'], 'T')]
        else:
            for p in params:
                rules += [(ours + f'mlp.c_fc.{p}', [theirs + f'mlp.{x}_proj.{p}' for x in ('gate', 'up')],
                           'cat'),
                          (ours + f'mlp.c_proj.{p}', [theirs + f'mlp.down_proj.{p}'], 'same')]
    return rules


def export_native(model, name):
    """A transformers model of class name (choose(model.config)'s) holding model's weights."""
    import transformers
    hf_config = transformers.AutoConfig.for_model(NATIVE[name].model_type, **hf_kwargs(name, model.config))
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    sd, shapes, sd_hf = model.state_dict(), {k: v.shape for k, v in hf.state_dict().items()}, {}
    for ours, theirs, how in weight_names(model.config):
        if how == 'cat':
            sd_hf.update(zip(theirs, sd[ours].split([shapes[k][0] for k in theirs])))
        else:
            sd_hf[theirs[0]] = sd[ours].transpose(-1, -2) if how == 'T' else sd[ours]
    hf.load_state_dict(sd_hf)
    return hf


def native_model_args(folder, raw):
    """The model keys of a folder of a NATIVE class (raw: its config.json), read before any weights;
    ValueError, one line naming the first config field that this repo cannot compute exactly."""
    import transformers
    name, native = next((n, c) for n, c in NATIVE.items() if c.model_type == raw['model_type'])
    hf = transformers.AutoConfig.from_pretrained(folder)
    known = {*native.fields, *native.fixed, *native.ignored, *IGNORED}
    for alias, field in type(hf).attribute_map.items():  # a field's other name (Qwen3-MoE: num_local_experts)
        known |= {alias, field} if alias in known or field in known else set()
    for field in raw:
        if field not in known:
            refuse(field, raw[field], f"a field of {name} that this repo does not read")
    for field, want in native.fixed.items():
        if getattr(hf, field, want) != want:
            refuse(field, getattr(hf, field), f"{name} with {field}={want!r} is what this repo computes")
    args = {**native.loads, **{k: v for k, v in native.keys.items() if not callable(v)}}
    for field, key in native.fields.items():
        have = getattr(hf, field, None)
        for k, v in (key.to_ours(have, hf) if isinstance(key, Field) else {key: have}).items():
            if k in args and args[k] != v:  # (Llama's attention_bias and mlp_bias are one key here: bias)
                refuse(field, have, f"{k}={v!r} where another field says {k}={args[k]!r}")
            args[k] = v
    return args


def check_loading_info(folder, info):
    """ValueError (one line) if transformers' loading report (from_pretrained(output_loading_info=True)) has
    a weight it made up (missing), left out (unexpected) or reshaped (mismatched): never silently."""
    for kind in ('missing_keys', 'unexpected_keys', 'mismatched_keys'):
        if info.get(kind):
            raise ValueError(f"{folder}: transformers reports {kind.replace('_', ' ')} for its weights, "
                             f"e.g. {sorted(info[kind])[0]}: the files do not match config.json")


def load_native(folder, model):
    """model (built from native_model_args) with the weights of folder, read by transformers itself."""
    import transformers
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                 output_loading_info=True)
    check_loading_info(folder, info)
    sd_hf, sd = hf.state_dict(), {}
    for ours, theirs, how in weight_names(model.config):
        if how == 'cat':
            sd[ours] = torch.cat([sd_hf[k] for k in theirs])
        else:
            sd[ours] = sd_hf[theirs[0]].transpose(-1, -2) if how == 'T' else sd_hf[theirs[0]]
    model.load_state_dict(sd)
    return model
