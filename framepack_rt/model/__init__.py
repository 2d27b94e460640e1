"""The transformer layer: FramePack's HunyuanVideo DiT and what it is made of (imports nothing above it).

* ``config``      -- FramePackConfig: the released config as a dataclass; presets "framepack-13b", "tiny".
* ``transformer`` -- FramePackTransformer: embedding, packing, blocks, output head, StepCache hook.
* ``blocks``      -- double- and single-stream blocks on the packed layout.
* ``layers``      -- embedders, token refiner, norms, feed-forward.
* ``rope``        -- 3D RoPE tables from explicit frame indices (full resolution and pooled).
* ``packing``     -- the varlen layout: cu_seqlens, join/split of video and context tokens.
* ``attention``   -- the attention dispatch point (flash-attn / Triton / SDPA).
* ``checkpoint``  -- mmap'd safetensors loading, sharded saving.
* ``offload``     -- BlockStreamer: transformer blocks streamed from one host arena, copies overlapping compute.
* ``memory_plan`` -- device memory of a run: weights, activations, buffers, VAE tiles; presets by budget.
* ``quantize``    -- fp8 weights for the blocks' linears (Fp8Linear, per-output-channel scales).
* ``step_plan``   -- StepPlan: what a section's steps share, prepared once.

The Triton kernels (``framepack_rt.kernels``) belong to this layer: they replace its torch ops.
"""
