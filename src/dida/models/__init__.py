"""MiT encoders, the DAFormer head, the segmentor and weight loading."""
