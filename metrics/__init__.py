"""Scoring generated text against references: the E2E challenge's metrics, and TER."""
