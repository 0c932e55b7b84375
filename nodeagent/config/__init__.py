"""Configuration, one direction: read (yamldoc.py) -> merge (sources.py, with the user-data part) ->
validate once (loader.py against schema.py and rules.py) -> typed result (model.py, where defaults live).
Commands use ``sources.load_for_command`` through ``nodeagent.commands.loadconfig``."""

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
