"""Training the project's own tokenizers and generators (pure PyTorch)."""
