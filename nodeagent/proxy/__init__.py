"""The CRI image-service proxy (``nodeagent run``)."""
