"""Code that two or more of the method packages need: IO, data, metrics, inference, run harness, demo data."""
