"""Trust plug-ins (outliers, robustness, calibration, OAL): see the trust issues."""
