"""Disk-pressure-aware eviction of cached images through CRI (issue 5).

``policy`` decides (pure), ``usage`` measures the image filesystem, ``baked`` reads the baked-images
manifest, ``loop`` runs inside ``nodeagent run`` and removes images one at a time.
"""
