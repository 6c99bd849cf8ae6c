"""SCT Retrieval: image retrieval with the Selectively Contrastive Triplet loss."""

__version__ = "0.1.0"
