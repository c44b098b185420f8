"""Tools around the service: replay of a file with its report, produce to the input topic, synthetic series."""
