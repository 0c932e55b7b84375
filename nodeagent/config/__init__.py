"""Configuration: one schema, one loader, typed result (see model.py)."""

from nodeagent.config.loader import ConfigError, Problem, load, load_text
from nodeagent.config.model import AUTO, Config

__all__ = ["AUTO", "Config", "ConfigError", "Problem", "load", "load_text"]
