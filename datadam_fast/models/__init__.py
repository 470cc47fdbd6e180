"""Networks (:mod:`.networks`: ConvNet family, AlexNet, VGG, ResNet; ``get_network``) and the
differentiable Siamese augmentation (:mod:`.augment`: ``DSA``)."""
