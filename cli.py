"""Entry point for running vl2v from a checkout: `python cli.py --help`."""

from vl2v.cli import main

if __name__ == "__main__":
    main()
