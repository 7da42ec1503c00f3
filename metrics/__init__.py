"""Scoring generated text against references: the E2E challenge's metrics (e2e.py), and TER (ter.py)."""
