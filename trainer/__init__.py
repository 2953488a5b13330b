"""Distributed trainer for contrastive sentence embeddings (SimCSE InfoNCE, SoftCSE, IFTCL)."""

__version__ = "0.1.0"
