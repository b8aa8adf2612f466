"""Image data: folders of images (with bad-file handling) and the built-in procedural scenes."""
from .images import IMAGE_EXTENSIONS, ImageDataset, load_rgb, scan_images, to_tensor
from .scenes import SCENE_CLASSES, SEGMENT_CLASSES, render_scene

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "SCENE_CLASSES", "SEGMENT_CLASSES", "load_rgb", "render_scene",
           "scan_images", "to_tensor"]
