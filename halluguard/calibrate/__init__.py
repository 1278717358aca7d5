"""Offline calibration tools (run once per model, results saved and passed to a method's config)."""
