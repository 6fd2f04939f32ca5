"""One distribution for the five method packages, the umbrella `projects` package and the
shared helpers in `projects_common`. The YAML configs ship as package data of `projects`
(`projects/configs` links to the top-level `configs/`)."""
from setuptools import find_packages, setup

PACKAGES = ["projects", "projects_common", "res2net", "dynamic_rcnn", "tsd", "decoupled_rcnn",
            "rdsnet"]

setup(
    name="d2-five-methods",
    version="0.1.0",
    description="Res2Net, Dynamic R-CNN, TSD, Decoupled R-CNN and RDSNet as Detectron2 plug-ins",
    python_requires=">=3.9",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, name + ".*")]),
    package_data={"projects": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
    install_requires=["fvcore", "iopath", "pycocotools", "opencv-python-headless", "tabulate"],
)
