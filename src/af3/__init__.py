"""af3: Audio Flamingo 3 in plain PyTorch."""
