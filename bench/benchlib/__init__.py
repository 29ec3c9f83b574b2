"""Helpers for the ubimesh proxy benchmark (bench/run.py)."""
