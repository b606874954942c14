"""detlab: config-driven training experiments for object detection (why SSD training fails)."""

__version__ = "0.1.0"
