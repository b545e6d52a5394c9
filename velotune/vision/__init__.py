"""The image side of vision-language training and serving: reading images (images.py) and turning them into the
tensors and expanded prompts a family's model takes (processor.py, one processor per family). No model code."""
from .images import DEFAULT_MAX_PIXELS, ImageCounters, load_image
from .processor import ImageProcessor, ProcessedImages, image_processor_for

__all__ = ["DEFAULT_MAX_PIXELS", "ImageCounters", "ImageProcessor", "ProcessedImages", "image_processor_for",
           "load_image"]
