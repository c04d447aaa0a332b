"""pumit-nnunet: PUMIT, the pre-trained universal medical image transformer, inside nnU-Net v2."""

__version__ = "0.1.0"
