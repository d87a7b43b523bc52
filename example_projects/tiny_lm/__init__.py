"""Conditioning of a small transformer language model (README.md)."""
