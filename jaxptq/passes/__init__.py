"""Plan-building passes, one per quantization mode."""
