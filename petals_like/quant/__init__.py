"""Blockwise weight quantization of a server's span (weights.py)."""
