"""The shapes-world research (the ladder R0-R3, its probes and diagnostics): experiments, not the product.

Nothing here is installed with the package or copied into the Docker image; see ``README.md`` beside this file.
"""
