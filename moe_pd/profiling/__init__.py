"""Per-rank torch.profiler traces (profiler.py) and the merged trace with overlap statistics (report.py)."""
