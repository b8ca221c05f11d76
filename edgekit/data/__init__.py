"""Data sets, splits and calibration/validation sources."""
