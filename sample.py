"""
Sample from a trained model (dense or MoE: the checkpoint says which).
$ python sample.py --out_dir=out-shakespeare-char-moe-cpu --start="ROMEO:"
$ python sample.py --init_from=gpt2 --start=FILE:prompt.txt
"""
import os
import sys
from contextlib import nullcontext

import torch

from configurator import configure, fail, check_choice, check_range, check_device, check_memory
from checkpoint import load_checkpoint, load_weights, load_meta, CheckpointError
from moe_model import build_model
from init_model import memory_need

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from an out_dir), a gpt2 variant (e.g. 'gpt2-xl') or a Hugging Face folder
out_dir = 'out'  # ignored if init_from is not 'resume'
ckpt_name = 'ckpt.pt'  # or 'ckpt_best.pt'
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 3  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, in predictions
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', etc.
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False  # use PyTorch 2.0 to compile the model to be faster
expert_impl = ''  # '' keeps the checkpoint's; any backend works with any checkpoint
use_kv_cache = True  # keep past keys/values instead of recomputing them (same tokens either way)
# -----------------------------------------------------------------------------
config = configure({k: v for k, v in globals().items() if not k.startswith('_')
                    and isinstance(v, (int, float, bool, str))},
                   sys.argv[1:])
globals().update(config)
check_choice(config, 'dtype', ('float32', 'bfloat16', 'float16'))
check_device(device)
check_range(config, ('num_samples', 'max_new_tokens'), 1)
if top_k is not None and top_k < 1:
    fail(f"top_k={top_k} must be >= 1 (or None: no cropping)")
if not temperature > 0:
    fail(f"temperature={temperature} must be > 0 (lower is closer to always picking the most likely token)")
if start.startswith('FILE:'):  # the prompt is read now, so that a bad file stops before the model loads
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read(2**20 + 1)  # at most a MiB: /dev/zero or a FIFO never ends
    except (OSError, UnicodeDecodeError) as e:
        fail(f"prompt file {start[5:]!r} cannot be read as UTF-8 text "
             f"({e.strerror if isinstance(e, OSError) else e.reason})")
    if len(start) > 2**20:
        fail(f"prompt file {config['start'][5:]!r} holds more than {2**20:,} characters: too long for a "
             f"prompt (the model reads its last block_size tokens)")
if not start:
    fail("start='' is empty: the model needs at least one token to continue (the default is a newline)")

torch.manual_seed(seed)
torch.cuda.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
device_type = 'cuda' if 'cuda' in device else 'cpu'  # for later use in torch.autocast
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)



def fits(model_args):
    """One line, before the model is built, if its weights and one block_size forward cannot fit on device."""
    check_memory(memory_need(model_args, model_args['block_size'], train=False), device,
                 hint="sample on a device with more memory")


# model
checkpoint = None
enc = None  # how the prompt is encoded when there is no meta.pkl: GPT-2's BPE unless a folder has its own
if init_from == 'resume':
    # init from a model saved in a specific directory
    try:
        checkpoint = load_checkpoint(os.path.join(out_dir, ckpt_name), map_location=device)
    except CheckpointError as e:
        fail(str(e))
    model_args = dict(checkpoint['model_args'])
    if expert_impl:
        model_args['expert_impl'] = expert_impl
    try:
        fits(model_args)
        from hf import folder_tokenizer, has_tokenizer  # a run that fine-tuned a folder keeps its tokenizer
        enc = folder_tokenizer(out_dir, model_args['vocab_size']) if has_tokenizer(out_dir) else None
        model = build_model(model_args)
        load_weights(model, checkpoint, os.path.join(out_dir, ckpt_name))
    except (ValueError, CheckpointError) as e:
        fail(str(e))
elif init_from in ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or os.path.isdir(init_from):
    # init from a given GPT-2 model, or a Hugging Face folder (GPT-2's, Llama's, Mixtral's, ...: hf/native.py)
    from hf import load_hf_folder, load_gpt2, hf_model_args, folder_tokenizer
    try:
        folder_args = hf_model_args(init_from)
        fits(folder_args)
        # a folder's own tokenizer, or GPT-2's BPE (one line if it has none): before the weights load
        enc = folder_tokenizer(init_from, folder_args['vocab_size']) if os.path.isdir(init_from) else None
        model = load_hf_folder(init_from) if os.path.isdir(init_from) else load_gpt2(init_from)
    except (ValueError, OSError) as e:
        fail(str(e))
else:
    fail(f"init_from={init_from!r}; allowed: 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a "
         f"Hugging Face model folder")

model.eval()
model.to(device)
if compile:
    model = torch.compile(model)  # requires PyTorch 2.0 (optional)

# look for the meta pickle in case it is available in the dataset folder
meta_path = None
# older checkpoints might not have these...
if checkpoint is not None and 'config' in checkpoint and 'dataset' in checkpoint['config']:
    meta_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                             checkpoint['config']['dataset'], 'meta.pkl')
if meta_path and os.path.exists(meta_path):
    print(f"Loading meta from {meta_path}...")
    try:
        meta = load_meta(meta_path)  # plain data only: never runs code named in the file
    except CheckpointError as e:
        fail(str(e))
    stoi, itos = meta.get('stoi'), meta.get('itos')
    if not (isinstance(stoi, dict) and isinstance(itos, dict)):
        fail(f"{meta_path} has no 'stoi' and 'itos' dicts (character -> id, id -> character): sample.py "
             f"cannot encode the prompt or decode the samples")
    unknown = sorted(set(c for c in start if c not in stoi))
    if unknown:
        fail(f"the prompt has characters outside the model's vocabulary: {''.join(unknown)!r}")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda l: ''.join([str(itos.get(i, '\ufffd')) for i in l])  # (an id meta.pkl lacks: U+FFFD)
else:
    if hasattr(enc, 'tokenizer'):  # hf.FolderTokenizer
        print(f"Encoding with {out_dir if init_from == 'resume' else init_from}'s own tokenizer "
              f"({type(enc.tokenizer).__name__})...")
    else:  # ok let's assume gpt-2 encodings by default
        print("No meta.pkl found, assuming GPT-2 encodings...")
        from data.tiktoken_offline import get_gpt2_encoding  # tiktoken 'gpt2', seeded offline if need be
        enc = enc or get_gpt2_encoding()
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = lambda l: enc.decode(l)

# encode the beginning of the prompt
start_ids = encode(start)
x = (torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...])

# run generation
with torch.no_grad():
    with ctx:
        for k in range(num_samples):
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k,
                               use_kv_cache=use_kv_cache)
            print(decode(y[0].tolist()))
            print('---------------')
