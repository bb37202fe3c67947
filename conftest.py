# Lets `pytest` import the six top-level modules from tests/ without installing the project.
import os

# The suite is CPU's: fp32, exact comparisons, gloo for the 2-rank tests. On a GPU machine,
# `CUDA_VISIBLE_DEVICES=0 python -m pytest -q tests` runs it on the GPU instead (the 2-rank
# tests then need a GPU per rank).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
