"""CRI (runtime.v1) and containerd API clients; protobuf stubs in ``gen/`` from ``proto/``."""
