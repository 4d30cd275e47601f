"""Decoding with a mixture of two models (a transformers LogitsProcessor and `generate`)."""
