"""Two-micro-batch overlap: communication of one micro-batch hidden behind computation of the other."""
