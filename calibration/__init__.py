"""Calibration: turn measurements into PerformanceModels, ship them, validate the simulator."""
