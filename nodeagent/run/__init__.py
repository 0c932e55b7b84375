"""The parts of ``nodeagent run`` that ``nodeagent.daemon.Daemon`` supervises, one job each:

- ``http.py``: ``/metrics`` and ``/healthz`` on ``metrics.listen`` (prometheus-client's server)
- ``upstream.py``: does the upstream image service answer (``/healthz``, the status file, a gauge)
- ``cachestats.py``: image count, bytes and imagefs usage (gauges and the status file's ``cache``)
- ``pulls.py``: every pull record to the status file and to the features' pull listeners
- ``statuswriter.py``: the status file (``nodeagent/statusfile.py`` is its model), written off the loop

systemd's protocols are in ``nodeagent/sd_daemon.py``, malloc_trim in ``nodeagent/memory.py``.
"""
