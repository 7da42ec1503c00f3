"""The lowest layer: errors, files, GPT-2 checkpoint files and devices. It imports nothing else of the project."""
