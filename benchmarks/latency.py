"""Streaming latency of framepack-rt end to end: a thin script over ``framepack-rt bench`` (the logic lives in
framepack_rt/bench/latency.py, so the installed CLI has it too).

    python benchmarks/latency.py --model tiny --json out.json                 # table, out.json, out.png
    python benchmarks/latency.py --scaling --viewers-sweep --json out.json    # + section and viewer scaling
    python benchmarks/latency.py --url http://127.0.0.1:8188/                 # a running `serve --stamp`
"""

from __future__ import annotations

import sys

from framepack_rt.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
