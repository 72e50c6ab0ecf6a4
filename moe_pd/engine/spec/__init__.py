"""Speculative decoding with the checkpoint's MTP module: acceptance rules (acceptance.py) and the model-side
step (mtp_step.py: draft a chain, verify K + 1 positions in one forward, redraft)."""
