"""`python -m vl2v`: the same as the `vl2v` command (and what torchrun runs: `torchrun ... -m vl2v`)."""

from vl2v.cli import main

main()
