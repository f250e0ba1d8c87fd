"""Graph rewrites: detect cross-entropy losses in FX graphs and replace them with smoothce ops."""
