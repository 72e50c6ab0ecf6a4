import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
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
