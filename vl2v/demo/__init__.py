"""The offline demo: a Digits-DG dataset and a small CLIP teacher built from packaged data."""
