"""
HellaSwag accuracy of a GPT-2-BPE model (a checkpoint, GPT-2) or of a Hugging Face folder (with its own
tokenizer, if it has one), scored as hellaswag.py says:
$ python tools/eval_hellaswag.py --out_dir=out-gpt2-moe                 # out_dir/ckpt.pt
                                                                       # (--ckpt_name=ckpt_best.pt)
$ python tools/eval_hellaswag.py --init_from=gpt2 --device=cuda        # gpt2-medium/-large/-xl,
                                                                       # a GPT-2 folder
$ python tools/eval_hellaswag.py --out_dir=out-gpt2-moe --max_examples=500   # the first 500 of the
                                                                             # 10,042 examples
"""
import os
import sys
from contextlib import nullcontext

import torch

# the repo root, for its modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, fail, check_choice, check_range, check_device  # noqa: E402
from hellaswag import HERE, HellaSwagError, prepare, score  # noqa: E402

# -----------------------------------------------------------------------------
# 'resume' (out_dir/ckpt_name), a checkpoint file (.pt), 'gpt2*', or a Hugging Face folder
init_from = 'resume'
out_dir = 'out'
ckpt_name = 'ckpt.pt'  # or 'ckpt_best.pt'
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
expert_impl = ''  # '' keeps the checkpoint's; any backend works with any checkpoint
max_examples = 0  # the first N validation examples; 0: all
data_dir = ''  # where hellaswag_val.jsonl is (downloaded to); '': data/hellaswag
# -----------------------------------------------------------------------------
config = configure({k: globals()[k] for k in ('init_from', 'out_dir', 'ckpt_name', 'device', 'dtype',
                                              'expert_impl', 'max_examples', 'data_dir')}, sys.argv[1:])
globals().update(config)
check_choice(config, 'dtype', ('float32', 'bfloat16', 'float16'))
check_device(device)
check_range(config, ('max_examples',), 0)
from checkpoint import load_checkpoint, load_weights, CheckpointError
from hf import GPT2_SIZES, has_tokenizer, hf_model_args, load_hf_folder, load_gpt2
# the model's vocab_size and block_size first (no weights
# yet): a character-level model stops before any download
ckpt = None
folder = None  # a Hugging Face folder: its own tokenizer, if it has one (hf.folder_tokenizer)
if init_from == 'resume' or init_from.endswith('.pt'):
    path = os.path.join(out_dir, ckpt_name) if init_from == 'resume' else init_from
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(str(e))
    model_args = dict(ckpt['model_args'], **({'expert_impl': expert_impl} if expert_impl else {}))
    dataset = ckpt.get('config', {}).get('dataset')  # its meta.pkl, if any, says the vocabulary is its own
    meta_path = os.path.join(HERE, 'data', dataset, 'meta.pkl') if isinstance(dataset, str) else None
    folder = out_dir if init_from == 'resume' and has_tokenizer(out_dir) else None  # a fine-tuned folder's
elif init_from in GPT2_SIZES or os.path.isfile(os.path.join(init_from, 'config.json')):
    try:
        model_args, meta_path = hf_model_args(init_from), None  # (a model this repo cannot compute: one line)
        folder = init_from if init_from not in GPT2_SIZES else None
    except ValueError as e:  # (or a config.json that is not one)
        fail(str(e))
else:
    fail(f"init_from={init_from!r}; allowed: 'resume', a checkpoint file (.pt), 'gpt2', 'gpt2-medium', "
         f"'gpt2-large', 'gpt2-xl', or a Hugging Face model folder")
try:
    examples = prepare(data_dir, max_examples, model_args['block_size'], model_args['vocab_size'], meta_path,
                       folder)
except HellaSwagError as e:
    fail(str(e))
try:
    if ckpt is not None:
        from moe_model import build_model
        model = build_model(model_args)
        load_weights(model, ckpt, path)
    else:
        model = load_hf_folder(init_from) if init_from not in GPT2_SIZES else load_gpt2(init_from)
except (ValueError, CheckpointError) as e:
    fail(str(e))
ckpt = None  # free the memory
model.to(device)
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)
acc, acc_norm, n = score(model, examples, device, ctx, verbose=True)
print(f"hellaswag: {n} examples, acc {acc:.4f}, acc_norm {acc_norm:.4f}")
