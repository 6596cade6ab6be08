"""bnlightning: Lightning modules and measurement callbacks for studying why BatchNorm works."""

__version__ = "0.1.0"
