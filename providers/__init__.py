"""Upstream providers by config kind. A provider is a module of plain functions over plain dicts."""
