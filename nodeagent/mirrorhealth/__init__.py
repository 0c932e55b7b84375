"""Mirror health: probe every configured registry mirror and take a dead one out of hosts.toml."""
