"""craftserve: a self-hosted, VisionCraft-compatible image generation server."""

__version__ = "0.1.0"
