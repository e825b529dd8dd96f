"""Command-line tools: the demo, its evaluation."""
