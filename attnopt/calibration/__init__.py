"""attnopt.calibration."""
