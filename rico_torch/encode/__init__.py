"""The encode half: sources -> one LMDB of safetensors values, as rico-hdl writes it.

``python -m rico_torch.encode --help`` lists the datasets; :func:`encode_dataset` is the API.
"""

from .discover import discover, find_patches
from .read import encode_value, read_bands, read_patch
from .writer import EncodeResult, encode_dataset

__all__ = ["discover", "find_patches", "encode_value", "read_bands", "read_patch", "EncodeResult", "encode_dataset"]
