"""Package discovery: moe_pd/ as is, plus two top-level folders mapped into the package.

kernels/ becomes moe_pd.kernels (never a top-level `kernels`: transformers probes for one) and
conf/ becomes moe_pd.conf, so Hydra finds the YAML as `pkg://moe_pd.conf` from a wheel and from an
editable install alike. The rest of the metadata is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
CONF_GROUPS = sorted(d.name for d in (HERE / "conf").iterdir() if d.is_dir() and not d.name.startswith("_"))

setup(
    packages=find_packages(include=["moe_pd", "moe_pd.*"])
    + ["moe_pd.kernels", "moe_pd.conf"]
    + [f"moe_pd.conf.{group}" for group in CONF_GROUPS],
    package_dir={"moe_pd": "moe_pd", "moe_pd.kernels": "kernels", "moe_pd.conf": "conf"},
    package_data={"moe_pd.conf": ["*.yaml"], **{f"moe_pd.conf.{g}": ["*.yaml"] for g in CONF_GROUPS},
                  "moe_pd.assets": ["tiny_bytes/*", "tiny_dsv3/*"]},
)
