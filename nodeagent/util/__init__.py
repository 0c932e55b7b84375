"""Utilities every part of nodeagent uses: atomic files, backoff, durations, endpoints, sizes,
logging, subprocesses, rate limits, malloc_trim, image references and host paths."""
