"""scmlab: simplified continuous-time consistency models (sCM), trained from WebDataset shards."""

__version__ = "0.1.0"
