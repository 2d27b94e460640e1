"""framepack-rt: real-time FramePack video generation streamed over WebRTC.

Import layout: the repository keeps ``framepack_rt/``, ``kernels/`` and ``stream/`` at the top level, but
``kernels`` (a Hugging Face package that transformers probes for) and ``stream`` are common top-level names.
So setup.py installs the two folders as sub-packages: ``kernels/`` -> ``framepack_rt.kernels`` and
``stream/`` -> ``framepack_rt.stream``. Nothing named ``kernels`` or ``stream`` lands in site-packages.
"""

from setuptools import setup

setup(
    name="framepack-rt",
    version="0.1.0",
    description="Real-time FramePack (HunyuanVideo) next-section video generation, streamed over WebRTC",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The layers, bottom up: model (and its kernels) <- engine <- pipeline <- commands, server, bench, demo.
    packages=[
        "framepack_rt",
        "framepack_rt.model",
        "framepack_rt.kernels",
        "framepack_rt.engine",
        "framepack_rt.pipeline",
        "framepack_rt.commands",
        "framepack_rt.stream",
        "framepack_rt.bench",
        "framepack_rt.demo",
    ],
    package_dir={"framepack_rt": "framepack_rt", "framepack_rt.kernels": "kernels", "framepack_rt.stream": "stream"},
    # The trained demo model (about 12 MB of fp16 safetensors) ships inside the package: `--model demo`.
    package_data={"framepack_rt.stream": ["static/*"], "framepack_rt.demo": ["weights/*/*"]},
    install_requires=[
        # A range that the local CPU wheel 2.13.0 satisfies: install torch==2.13.0 first (see README).
        "torch>=2.4,<3",
        "triton>=3.0",
        "einops>=0.7",
        "numpy>=1.24",
        "safetensors>=0.4",
        # >=5.0: SiglipImageProcessorPil, from_pretrained(dtype=), tokenizers-backend folders. 5.25 requires
        # Hugging Face's `kernels` and imports it at start-up; run from this repository's root, Python finds our
        # kernels/ folder under that name first, and kernels/__init__.py hands the name over (tested with 5.25).
        "transformers>=5.0",
        "diffusers>=0.34",  # AutoencoderKLHunyuanVideo: the VAE
        "accelerate>=1.0",  # diffusers and transformers load without it only after a warning on every run
        "tokenizers>=0.19",
        "aiortc>=1.9",
        "aiohttp>=3.9",
        "av>=12",
        "pillow>=10",
        "matplotlib>=3.5",  # framepack-rt bench draws its latency plot
        "prometheus_client>=0.17",  # serve's /metrics
    ],
    extras_require={
        # playwright: the Python package only; it drives Debian's /usr/bin/chromium (no `playwright install`).
        # ray[serve]: the tests deploy the cluster application on a local Ray instance (tests/stream/test_cluster.py).
        "test": ["pytest>=8", "hypothesis>=6", "playwright>=1.40", "ray[serve]>=2.60,<3"],
        "flash": ["flash-attn>=2.6"],
        "cluster": ["ray[serve]>=2.60,<3"],  # serve --cluster ray (stream/cluster.py)
    },
    entry_points={"console_scripts": ["framepack-rt=framepack_rt.commands.cli:main"]},
)
