"""Triton kernels, imported as moe_pd.kernels (see setup.py). CPU runs use the torch references."""
