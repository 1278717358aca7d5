"""Hallucination evaluation (``halluguard.eval``): CHAIR and POPE."""
