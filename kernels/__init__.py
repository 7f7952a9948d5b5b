"""
The MoE layer's optional fast paths, each checked against moe_model.loop_experts in the tests:
  cpu_grouped_mm.py/.cpp  the grouped backend's GEMM on the CPU (experts side by side), built on first use
  moe_triton.py           the 'triton' backend: MegaBlocks-style block-sparse kernels (needs triton)
  cpu_memory.py           keep_freed_memory(): glibc keeps freed blocks, so CPU steps do not page-fault
"""
