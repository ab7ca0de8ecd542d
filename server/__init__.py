"""The sovereign aggregator: ServerApp round loop and checkpoints."""
