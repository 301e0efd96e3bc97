"""edgeops: GitOps for ML models on edge fleets."""

__version__ = "0.1.0"
