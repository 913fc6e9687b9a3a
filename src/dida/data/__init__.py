"""Datasets, label conversion, transforms, rare-class sampling and synthetic data writers."""
