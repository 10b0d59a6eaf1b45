"""Reading published checkpoint formats safely: sniffing, limits, a pickle scan, loading."""
