"""Figures, pages and W&B reports built from logged runs."""
