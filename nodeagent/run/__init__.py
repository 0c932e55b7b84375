"""``nodeagent run``: ``daemon.py``'s ``Daemon`` supervises the proxy, the features' workers and
these parts, one job each:

- ``http.py``: ``/metrics`` and ``/healthz`` on ``metrics.listen`` (prometheus-client's server)
- ``metrics.py``: every metric nodeagent exports (names are the contract)
- ``upstream.py``: does the upstream image service answer (``/healthz``, the status file, a gauge)
- ``cachestats.py``: image count, bytes and imagefs usage (gauges and the status file's ``cache``)
- ``pulls.py``: every pull record to the status file and to the features' pull listeners
- ``statusfile.py``: the status file's typed, versioned model; ``statuswriter.py`` writes it off
  the loop; ``status.py`` reads it back for ``nodeagent status``
- ``sd_daemon.py``: systemd's protocols (sd_notify, watchdog, the socket passed by nodeagent.socket)

malloc_trim is ``nodeagent/util/memory.py``.
"""
