"""
The MoE layer's optional fast paths, each checked against moe_model.loop_experts in the tests:
  cpu_grouped_mm.py/.cpp  the grouped backend's GEMM on the CPU (experts side by side), built on first use
  moe_triton.py           the 'triton' backend: MegaBlocks-style block-sparse kernels (needs triton)
  triton_aot.py           those kernels compiled for each GPU without one: what compiles and fits where
  cpu_memory.py           keep_freed_memory(): glibc keeps freed blocks, so CPU steps do not page-fault
  grouped_mm.py           the grouped GEMMs as custom ops (torch.compile traces them)
  fused.py                the grouped backend in one op on the CPU (its kernel: cpu_grouped_mm.cpp)
and auto_expert_impl below: which backend expert_impl='auto' runs on a device. (The folder is not called
`kernels`: that is Hugging Face's kernels package, which transformers imports.)
"""
import importlib.util

import torch



def auto_expert_impl(device, dtype, expert_hidden):
    """What expert_impl='auto' (train.py's default) runs on this device: (backend, a warning or None).
    CPU: 'grouped' (moe_kernels/cpu_grouped_mm.cpp). CUDA sm90/sm100 (H100, H200, B200) in bfloat16:
    'grouped', torch's fused grouped_mm, which takes bfloat16 alone there (GroupedBlas.cpp). Otherwise (other
    dtypes, other GPUs) torch's grouped_mm runs one GEMM per expert with a device-to-host sync, so 'triton'
    when it is installed, its kernels compile and fit this GPU in this dtype (moe_triton.SUPPORTED, checked
    ahead of time by moe_kernels/triton_aot.py) and expert_hidden is a multiple of 16; else 'grouped', with a
    warning that says why it will be slow."""
    if not device.startswith('cuda'):
        return 'grouped', None
    major, minor = torch.cuda.get_device_capability(device)
    fused = major in (9, 10)  # torch's fused grouped GEMM runs on these, in bfloat16
    if fused and dtype == 'bfloat16':
        return 'grouped', None
    cc = 10 * major + minor
    if importlib.util.find_spec('triton') is None:
        why = 'triton is not installed'
    else:
        from moe_kernels import moe_triton  # (it imports triton)
        why = (f'sm{cc} has no tensor cores for {dtype}' if (cc, dtype) in moe_triton.NOT_FAST else
               f'moe_triton.SUPPORTED does not list sm{cc} with {dtype}: '
               'not all its Triton configurations compile and '
               'fit there, or they were not checked (moe_kernels/triton_aot.py)'
               if (cc, dtype) not in moe_triton.SUPPORTED else
               f'triton needs expert_hidden divisible by 16, not {expert_hidden}' if expert_hidden % 16
               else None)
    if why is None:
        return 'triton', None
    bf16_only = ' (its fused kernel is bfloat16-only)' if fused else ''
    return 'grouped', (f"expert_impl='auto' runs 'grouped' on this sm{cc} GPU in {dtype}, "
                       "where torch's grouped_mm is one GEMM per expert and a host sync per "
                       f"layer{bf16_only}: slow; {why}")
