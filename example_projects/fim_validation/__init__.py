"""Do the sub-FIMs and their Kronecker approximation tell the full FIM's story? (README.md)"""
