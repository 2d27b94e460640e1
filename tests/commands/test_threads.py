"""serve's --threads (framepack_rt/commands/threads.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from framepack_rt.commands import threads


def test_threads_flag_checks_its_value():
    parser = argparse.ArgumentParser()
    threads.add_argument(parser)
    assert parser.parse_args(["--threads", "1"]).threads == 1
    assert parser.parse_args([]).threads is None
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])


def test_serve_threads_reach_torch():
    """In a fresh process, `framepack-rt serve --threads 1` gives torch 1 intra-op thread before serving (the
    serve command itself is replaced, so nothing is served), and the user's OMP_WAIT_POLICY is left alone."""
    script = """
import argparse, os, sys
from framepack_rt.commands import cli

def fake_serve(args):
    import torch
    print(os.environ.get("OMP_WAIT_POLICY"), torch.get_num_threads(), args.threads)
    return 0

build = cli.build_parser
def patched():
    parser = build()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["serve"].set_defaults(run=fake_serve)
    return parser
cli.build_parser = patched
sys.exit(cli.main(["serve", "--threads", "1"]))
"""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PASSIVE", "1", "1"]
