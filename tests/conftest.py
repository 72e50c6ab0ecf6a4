import os
import sys
from pathlib import Path

import pytest
import torch  # imports no kernel module

# Before any kernel module is imported: Triton's interpreter on a CPU-only machine (CI), the compiler where
# a GPU is visible. Interpreted kernels on a GPU copy every tensor through numpy, minutes per call.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint dir), built once per session."""
    from helpers.hf_models import V2_CONFIGS, V3_CONFIGS, make_hf_model

    out = {}
    root = tmp_path_factory.mktemp("hf")
    for name in [*V3_CONFIGS, *V2_CONFIGS]:
        model = make_hf_model(name)
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out
