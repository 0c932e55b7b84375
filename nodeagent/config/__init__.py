"""Configuration: one schema (schema.py), one loader (loader.py), typed result (model.py)."""

from nodeagent.config.loader import default_config, load, load_data, load_text, parse_yaml
from nodeagent.config.model import AUTO, Config
from nodeagent.config.problems import ConfigError, Problem

__all__ = [
    "AUTO",
    "Config",
    "ConfigError",
    "Problem",
    "default_config",
    "load",
    "load_data",
    "load_text",
    "parse_yaml",
]
