"""
train.py's settings, checked before any work starts (configurator.py has already checked their types): a bad
value is one `error:` line and exit code 2 (configurator.fail), not a traceback minutes into the run.
"""
from configurator import fail, check_choice, check_range, check_device
from model import CHECKPOINTING
from muon import config_error as optimizer_error


def check_config(config):
    """The values of train.py's own keys; the model's (MoEConfig), the data's and expert parallelism's are
    checked where train.py reads them."""
    if config['wandb_log']:
        try:
            import wandb  # noqa: F401  (start_wandb imports it again, after the model is built)
        except ImportError:
            fail("wandb_log=True needs the wandb package: pip install wandb")
    check_choice(config, 'dtype', ('float32', 'bfloat16', 'float16'))
    check_choice(config, 'on_nonfinite', ('stop', 'skip'))
    check_choice(config, 'activation_checkpointing', CHECKPOINTING)
    check_device(config['device'])
    check_range(config, ('batch_size', 'gradient_accumulation_steps', 'block_size', 'eval_iters',
                         'log_interval', 'eval_interval'), 1)
    check_range(config, ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr',
                         'weight_decay', 'grad_clip', 'upcycle_noise', 'hellaswag_interval',
                         'hellaswag_examples', 'peak_flops'), 0)
    check_range(config, ('beta1', 'beta2'), 0, 1)
    check_range(config, ('seed',), 0, 2**32)
    if message := optimizer_error(config):
        fail(message)
    if not config['out_dir']:
        fail("out_dir='' must name a folder")
