"""Typed configuration: target profiles, build files, one section per build stage."""

from .base import *  # noqa: F401,F403  (split by responsibility below)
