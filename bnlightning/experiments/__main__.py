"""``python -m bnlightning.experiments``: see ``bnlightning.experiments.cli``."""

from bnlightning.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
