"""Scoring models on prompt/answer data, and finding alpha by a sweep."""
