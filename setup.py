# All metadata lives in pyproject.toml. The CUDA kernels in csrc/ are not built here: adallm_ops
# compiles them with ninja on first import on a CUDA machine (adallm_ops/_build.py), so
# `pip install -e .` works the same with or without a GPU.
from setuptools import setup

setup()
