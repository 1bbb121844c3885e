"""Shipped test fixtures: the tiny random Phi-3 and the local hub that serves it on loopback."""
