"""
nanoMoE's MoEGPT (or, with n_expert=0, its dense GPT: a block no transformers class computes) as a Hugging
Face transformers model (trust_remote_code=True). hf.export_moe writes this file into the exported folder with
the repo's own model.py and moe_model.py in place of the import marked below, so the folder needs no nanoMoE
checkout and computes exactly what MoEGPT computes in eval mode (per-token top-k routing, no noise, jitter or
dropout), with the same parameter names; expert_impl='loop', the reference backend: exact, not fast. No KV
cache: generate() recomputes the context.
"""
from dataclasses import fields

from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from moe_model import EXPORTED_KEYS, MoEConfig, build_model  # nanomoe: the model code goes here


class NanoMoEConfig(PretrainedConfig):
    """Every key of MoEConfig that says what the model computes (EXPORTED_KEYS), under nanoMoE's names; top_k
    as num_experts_per_tok (transformers reads a config's top_k as a sampling setting). A key that config.json
    lacks (an older export) is MoEConfig's default, or its router preset's."""
    model_type = 'nanomoe'
    attribute_map = {'hidden_size': 'n_embd', 'max_position_embeddings': 'block_size',
                     # transformers' names for nanoGPT's
                     'num_attention_heads': 'n_head', 'num_hidden_layers': 'n_layer'}

    def __init__(self, num_experts_per_tok=2, **kwargs):
        self.num_experts_per_tok = num_experts_per_tok
        for f in fields(MoEConfig):
            if f.name in EXPORTED_KEYS and f.name != 'top_k':
                setattr(self, f.name, kwargs.pop(f.name, f.default))
        kwargs.setdefault('tie_word_embeddings', self.tie_embeddings)  # (True: transformers ties the head)
        kwargs.setdefault('use_cache', False)
        super().__init__(**kwargs)

    def model_args(self):
        """The MoEGPT keys of this config."""
        return {'top_k': self.num_experts_per_tok, **{k: getattr(self, k) for k in EXPORTED_KEYS
                                                      if k != 'top_k'}}


class NanoMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoMoEConfig
    base_model_prefix = 'transformer'
    _tied_weights_keys = {'lm_head.weight': 'transformer.wte.weight'}

    def __init__(self, config):
        super().__init__(config)
        model = build_model({**config.model_args(), 'expert_impl': 'loop'})  # (n_expert=0: the dense GPT)
        # MoEGPT's modules, registered here under their own names (transformer.*, lm_head), so that the
        # weights' names are nanoMoE's; the MoEGPT itself is kept unregistered, to run them
        self.transformer, self.lm_head = model.transformer, model.lm_head
        object.__setattr__(self, 'moegpt', model)
        self.post_init()

    # MoEGPT's constructor drew the weights as nanoMoE does; loading replaces them
    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if input_ids.size(1) > self.config.block_size:
            raise ValueError(f"{input_ids.size(1)} tokens do not fit the model's "
                             f"block_size={self.config.block_size}")
        logits = self.lm_head(self.moegpt.hidden(input_ids))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):  # no cache: the whole (cropped) context
        return {'input_ids': input_ids[:, -self.config.block_size:]}


NanoMoEConfig.register_for_auto_class()
NanoMoEForCausalLM.register_for_auto_class('AutoModelForCausalLM')
