"""nodeagent: take image pulls out of pod start-up on Kubernetes nodes, and make every pull visible."""

__version__ = "0.1.0"
