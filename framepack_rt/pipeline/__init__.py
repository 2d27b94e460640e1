"""The pipeline layer: pictures and prompts in, video frames out (imports the engine and the model).

* ``framepack_pipeline`` -- FramePackPipeline.from_pretrained / .stream() / .generate().
* ``video_stream``       -- VideoStream: one generation's sections; prompt, LoRA, pause and stop changes.
* ``fast_decoder``       -- FastVideoDecoder and its streaming decoder: latents to frames at a fraction of the VAE's cost.
* ``encoders``           -- LLaMA / CLIP / SigLIP wrappers (transformers classes).
* ``vae``                -- HunyuanVideo VAE (diffusers), StreamingDecoder, latent preview.
* ``cpu_conv``           -- conv2d-tap path for the VAE's Conv3d on CPUs.
* ``parts``              -- where the pipeline's models come from: built in, folders, low-VRAM.
* ``model_folders``      -- published folder layouts, per-part loading.
* ``builtin``            -- the model sets that ship with the package: "demo" (trained) and "tiny" (random).
* ``devices``            -- --device / --dtype: names, defaults ("auto") and placement, shared by every command.
* ``memory``             -- what a model set needs against what is free, checked before loading.
* ``tiny_models``        -- the built-in tiny model set, tokenizers built in code.
* ``media``              -- resolution buckets, image fitting, prompt timelines, MP4 writer.
"""
