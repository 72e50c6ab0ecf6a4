"""Torch-free engine core: sequence state, page accounting with a prefix cache, and the scheduler.

Nothing here imports torch: it is plain data and decisions, tested on plain lists (tests/unit/test_engine_core*).
"""
