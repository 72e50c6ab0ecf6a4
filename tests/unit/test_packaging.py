"""The wheel carries the Hydra configs and maps kernels/ to moe_pd.kernels (never a top-level `kernels`)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("moe_pd-*.whl"))


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "moe_pd/conf/generate.yaml" in names
    assert {"moe_pd/conf/model/tiny.yaml", "moe_pd/conf/model/deepseek_v3.yaml", "moe_pd/conf/model/path.yaml",
            "moe_pd/conf/model/deepseek_v2_lite.yaml"} <= set(names)
    assert "moe_pd/kernels/__init__.py" in names
    assert {"moe_pd/assets/tiny_bytes/tokenizer.json", "moe_pd/assets/tiny_bytes/tokenizer_config.json"} <= set(names)
    assert {"moe_pd/assets/tiny_dsv3/model.safetensors", "moe_pd/assets/tiny_dsv3/tokenizer.json"} <= set(names)
    assert not any(n.startswith("kernels/") or n.startswith("conf/") for n in names)


def test_configs_compose_from_the_wheel(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import moe_pd; assert moe_pd.__file__.startswith(sys.path[0]), moe_pd.__file__\n"
        "from hydra import compose, initialize_config_module\n"
        "from moe_pd.config.store import register_configs\n"
        "register_configs()\n"
        "with initialize_config_module('moe_pd.conf', version_base=None):\n"
        "    print(compose('generate', overrides=['model=deepseek_v3']).model.hidden_size)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "7168"
