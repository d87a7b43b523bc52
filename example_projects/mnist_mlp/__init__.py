"""The paper's claims 1 and 2 on a deep MLP (README.md)."""
