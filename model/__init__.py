"""Model: ResNet-50 backbone with BN neck, the UBS style module, per-source memory classifiers."""
