"""Scores computed from scratch for the tasks beyond E2E (TER for WebNLG and DART)."""
