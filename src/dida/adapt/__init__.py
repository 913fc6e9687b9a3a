"""Domain-adaptation pieces: EMA teacher, augmentation, ClassMix, instance bank, losses, methods."""
