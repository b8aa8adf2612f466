"""Training loops (plain PyTorch, torchrun-ready), one file per stage."""
