"""The VisionCraft dialect: its request models (models.py) and routes (routes.py)."""

from app.api.visioncraft.routes import router, to_image_request

__all__ = ["router", "to_image_request"]
