"""
Export a checkpoint to a Hugging Face model folder (config.json + model.safetensors), for transformers,
the Hub, vLLM and lm-eval-harness:
$ python tools/export_hf.py --out_dir=out-shakespeare-char-moe-cpu --hf_dir=hf-shakespeare-char-moe
It prints the class it wrote and why (hf.export; the table is hf/native.py's NATIVE):
- the transformers class that computes exactly this model, loaded with no trust_remote_code: an MoE with the
  modern block as MixtralForCausalLM, Qwen3MoeForCausalLM or OlmoeForCausalLM, a dense one as LlamaForCausalLM
  or Qwen3ForCausalLM, a GPT-2-block dense one as GPT2LMHeadModel (activation_function='gelu', nanoGPT's exact
  GELU; zero biases where the model has none);
- any other model (GPT-2's block with experts, other routers, shared experts, ...) as NanoMoEForCausalLM,
  whose code (hf/modeling_nanomoe.py) is copied into the folder:
  AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True) loads it with no nanoMoE checkout.
The folder is written whole or not at all (a temp folder beside it, renamed; one that a killed export left is
removed by the next), and an existing one is never overwritten. It says what it is (hf.describe): a GPT-2 BPE
model gets GPT-2's tokenizer files and bos/eos ids, a character-level one its characters in README.md.
load_hf_folder is the way back (train.py and sample.py --init_from=<folder>).
"""
import os
import sys
import glob
import shutil

# the repo root, for its modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, fail  # noqa: E402
from checkpoint import load_checkpoint, load_weights, load_meta, CheckpointError  # noqa: E402
import hf  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run whose checkpoint is exported
ckpt_name = 'ckpt.pt'  # or 'ckpt_best.pt'
hf_dir = ''  # the folder to write (must not exist, or be empty)
# -----------------------------------------------------------------------------


def remove_killed_exports(hf_dir):
    """The temp folders <hf_dir>.tmp-<pid> of exports that are no longer running (killed midway)."""
    for tmp in glob.glob(glob.escape(hf_dir) + '.tmp-*'):
        try:
            os.kill(int(tmp.rsplit('-', 1)[1]), 0)  # a live export's (or another user's): left alone
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {tmp}, left by an export that was killed midway")
        except (ValueError, PermissionError):
            pass


if __name__ == '__main__':
    config = configure({'out_dir': out_dir, 'ckpt_name': ckpt_name, 'hf_dir': hf_dir}, sys.argv[1:])
    out_dir, ckpt_name, hf_dir = config['out_dir'], config['ckpt_name'], config['hf_dir']
    if not hf_dir:
        fail("hf_dir='' must name the folder to write, e.g. --hf_dir=hf-my-model")
    hf_dir = hf_dir.rstrip(os.sep) or os.sep
    remove_killed_exports(hf_dir)
    if os.path.exists(hf_dir) and (not os.path.isdir(hf_dir) or os.listdir(hf_dir)):
        fail(f"hf_dir={hf_dir!r} exists and is not an empty folder: nothing is overwritten; choose another")
    path = os.path.join(out_dir, ckpt_name)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        fail(str(e))
    from moe_model import build_model
    try:
        model = build_model(ckpt['model_args'])
        load_weights(model, ckpt, path)
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    model.eval()
    hf_model, why = hf.export(model)
    print(f"exporting as {why}")
    tmp = f'{hf_dir}.tmp-{os.getpid()}'  # written whole, then renamed: never half a folder
    dataset = ckpt.get('config', {}).get('dataset')  # its meta.pkl, if any: a vocabulary of its own
    meta_path = os.path.join(hf.REPO, 'data', dataset, 'meta.pkl') if isinstance(dataset, str) else ''
    try:
        meta = load_meta(meta_path) if os.path.exists(meta_path) else None
    except CheckpointError as e:
        fail(str(e))
    try:
        hf.save(hf_model, tmp)
        own = hf.has_tokenizer(out_dir)  # the tokenizer of a folder the run fine-tuned (train.py kept it)
        if own:
            hf.copy_tokenizer(out_dir, tmp)
        hf.describe(tmp, ckpt['model_args'], meta, type(hf_model).__name__, own)  # tokenizer, bos/eos, README
    except Exception as e:  # a read-only folder, a full disk: whatever the writers raise, one line
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot write {hf_dir} ({' '.join(str(e).split())[:300] or type(e).__name__}); nothing written")
    try:
        os.rename(tmp, hf_dir)  # (over an empty folder too; never over a full one)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raced = os.path.isdir(hf_dir) and os.listdir(hf_dir)
        fail(f"hf_dir={hf_dir!r} was written by another export meanwhile: nothing is overwritten"
             if raced else f"cannot write {hf_dir} ({e.strerror or e}); nothing written")
    remote = hf_model.config.model_type == 'nanomoe'
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(hf_model).__name__} ({n_params / 1e6:.2f}M parameters) to {hf_dir}"
          + ("; load it with trust_remote_code=True" if remote else ''))
