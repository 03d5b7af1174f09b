"""git-gateway: a Git-over-SSH gateway for push-to-deploy platforms."""

__version__ = "0.1.0"
