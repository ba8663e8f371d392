"""vl2v: distil a CLIP teacher into a small timm student that generalises to unseen domains."""

__version__ = "0.1.0"
