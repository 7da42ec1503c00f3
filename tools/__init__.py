"""Tools around the lesson: file plumbing, checkpoints, decoding, metrics, the paper's experiments, benchmarks.

A student reads model.py, lora.py and train.py; nothing here is needed to follow them. Scripts in this folder
run from the repository's root as modules, e.g. `python -m tools.sweep --help`.
"""
