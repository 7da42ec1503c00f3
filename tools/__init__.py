"""Tools beside the lesson: the paper's experiments, measurements and conversions, each a command of its own.

sweep.py (section 7's sweeps: one adapter per rank or target set, a table), analyze.py (section 7's analyses on
adapter files), bench.py (speed and memory against transformers and PEFT; writes docs/performance.md),
fast_decode.py (opt-in decode layouts that bench times), gpu_check.py (what only a CUDA GPU can tell),
peft_adapter.py (an adapter as a PEFT folder). A student reads model.py, lora.py and train.py; nothing here is
needed to follow them. Each runs from the repository's root as a module, e.g. `python -m tools.sweep --help`.
"""
