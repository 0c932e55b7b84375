"""Images on the node's disk before pods need them: prefetch and bake, the Node's image readiness,
registry credentials and the last-used record."""
