"""The engine layer: sampling sections of latents with a transformer (imports only ``framepack_rt.model``).

* ``schedules`` -- section layouts as data: F1, inverted anti-drifting, vanilla, custom patterns.
* ``context``   -- ContextRing: the constant-length context ring buffer.
* ``sampling``  -- flow-matching sigmas and shift, UniPC bh1/bh2, Euler, CFG, seeded noise.
* ``teacache``  -- TeaCache as a policy object.
* ``generator`` -- SectionGenerator: one section of latents per call.
"""
