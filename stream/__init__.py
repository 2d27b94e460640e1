"""WebRTC frame server, installed as ``framepack_rt.stream`` (see setup.py for why not top-level ``stream``).

``framepack-rt serve`` (:mod:`framepack_rt.stream.server`) streams live FramePack generation to browsers:
sessions and viewers in :mod:`.session`, the generation thread in :mod:`.generation`, bounded buffering and
pacing in :mod:`.buffer` and :mod:`.tracks`, the data-channel protocol in :mod:`.control`, and a Python viewer
for tests and benchmarks in :mod:`.client`. This module stays import-light: the CLI reads the default here.
"""

from framepack_rt.pipeline.builtin import DEFAULT_MODEL  # noqa: F401 -- defined once, with the model names
