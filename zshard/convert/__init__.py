"""Conversions over the store: import, inspect, reshard, consolidate. No process group needed."""
