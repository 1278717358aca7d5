"""Bridges to evaluation harnesses; each is optional and imports its harness only when used."""
