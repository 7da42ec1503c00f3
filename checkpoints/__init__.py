"""Files that hold a model or a run: adapters (ours and PEFT's), loading a model for a script, a run's folder."""
