"""Runtime helpers below the maths: device choice, torchrun process groups, checkpoint I/O and atomic
file writes. Nothing here knows about losses, models or the training loop."""
