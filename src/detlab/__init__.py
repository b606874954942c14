"""detlab: config-driven training experiments for object detection (why SSD training fails).

``from detlab import Detector``: a trained checkpoint (or its ONNX export) on your own images
(``detlab.predictor.Detector``; ``Detector.load(path).predict(image)``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Detector", "Detections", "__version__"]

_PREDICTOR_NAMES = ("Detector", "Detections")


def __getattr__(name: str) -> Any:
    # The predictor is imported on first use, not with the package, for start-up time: every
    # ``import detlab.<module>`` runs this file (train.py checks its config before torch is imported,
    # and each DataLoader worker and subprocess imports the package again).
    if name in _PREDICTOR_NAMES:
        from detlab import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PREDICTOR_NAMES})
