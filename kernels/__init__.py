"""
The MoE layer's optional fast paths, each checked against moe_model.loop_experts in the tests:
  cpu_grouped_mm.py/.cpp  the grouped backend's GEMM on the CPU (experts side by side), built on first use
  moe_triton.py           the 'triton' backend: MegaBlocks-style block-sparse kernels (needs triton)
  triton_aot.py           those kernels compiled for each GPU without one: what compiles and fits where
  cpu_memory.py           keep_freed_memory(): glibc keeps freed blocks, so CPU steps do not page-fault
"""
