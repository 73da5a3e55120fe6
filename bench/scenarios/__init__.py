"""Each command's measurement, run inside a point's child: memory, latency, capacity, accuracy."""
