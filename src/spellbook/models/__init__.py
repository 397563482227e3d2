"""Model files: finding, hashing, checking and loading checkpoints into Components."""
