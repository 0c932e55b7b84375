"""``nodeagent apply``: node facts, auto sizing, the per-target renderers (``targets/``), restarts
and the runner."""
