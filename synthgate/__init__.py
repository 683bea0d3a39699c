"""synthgate: decide with evidence whether synthetic medical images may be released.

The core package: image I/O, image sets, hashing and atomic outputs, device
choice, phantom data and the umbrella CLI.  Importing it stays light (no
torch), so every ``--help`` answers instantly.
"""
__version__ = "0.1.0"
