"""``python -m bnlightning``: see ``bnlightning.cli``."""

from bnlightning.cli import main

if __name__ == "__main__":
    main()
