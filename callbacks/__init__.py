"""Measurement callbacks (ICS, loss landscape, activation statistics); depend on torch and lightning only."""
