"""rico_torch: remote-sensing patch datasets as LMDB/safetensors, fed fast to PyTorch."""

__version__ = "0.1.0"
