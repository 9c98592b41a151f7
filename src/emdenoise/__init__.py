"""emdenoise: self-supervised blind-spot denoising for low-dose electron microscopy.

Arrays are ``(T, Y, X)`` float32 in memory: T frames (time or tilt), Y rows, X columns.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("emdenoise")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
