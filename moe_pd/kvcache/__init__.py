"""Paged MLA latent cache and page accounting."""
