"""Serving: the ONNX chat model (models-from-code), its signature, and the HTTP app around
MLflow's scoring server.
"""
