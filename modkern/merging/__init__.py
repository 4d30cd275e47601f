"""Merging whole models in memory: state dicts, name patterns and alpha rules."""
