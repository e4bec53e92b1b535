"""Model-side stages: diffusion key-frame translation, propagation, face enhancement."""
