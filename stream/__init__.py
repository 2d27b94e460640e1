"""WebRTC frame server, installed as ``framepack_rt.stream`` (see setup.py for why not top-level ``stream``)."""
