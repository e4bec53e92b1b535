"""Fine-tuning TPSMM (the face module's reenactment model) on sign-language face crops.

`vgg` holds the frozen VGG-19 of the perceptual loss, `losses` TPSMM's training losses and
`train` a framework-agnostic training step that Ray Train (or a plain loop) drives. Nothing is
imported here: the submodules import torch, and the driver imports this package.
"""
