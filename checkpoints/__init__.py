"""Files that hold a model or a run: adapters (ours and PEFT's), loading a model, a run's folder, merged checkpoints."""
