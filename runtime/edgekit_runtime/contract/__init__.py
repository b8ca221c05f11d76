"""What host and device agree on: the bundle format and typed manifest, the fleet protocol, error codes.

Standard library only (a test enforces it), so any program can read a bundle's manifest.
"""
