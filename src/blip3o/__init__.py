"""blip3o: unified multimodal models of the BLIP3-o family (understand, generate and edit images).

Importing the package has no side effects: no network, no GPU, no disk.
"""

__version__ = "0.1.0"
