"""Model-level transforms applied before calibration: orthogonal (Hadamard) rotations."""
