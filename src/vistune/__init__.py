"""vistune: parameter-efficient adaptation of frozen pretrained vision models."""
__version__ = "0.1.0"
