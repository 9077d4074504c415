"""Verdict: the access model and the cause catalog that name why a denial happened."""
