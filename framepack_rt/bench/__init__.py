"""``framepack-rt bench``: latency end to end. ``latency`` runs it, ``browser`` is the headless Chromium
viewer, ``report`` turns what the viewers recorded into figures, JSON and a plot."""
