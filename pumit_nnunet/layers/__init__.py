"""Primitive layers: SAC convolutions, additive 3D RoPE, EVA-02 attention and SwiGLU."""

from pumit_nnunet.layers.attention import EvaAttention
from pumit_nnunet.layers.mlp import SwiGLU
from pumit_nnunet.layers.pos_embed import resample_pos_embed
from pumit_nnunet.layers.rope import AdditiveRope3d, apply_rope, rope_angles
from pumit_nnunet.layers.sac import (
    SpatialModule,
    SpatialSequential,
    SpatiallyAdaptiveConv3d,
    SpatiallyAdaptiveConvTranspose3d,
    reduce_depth_kernel,
)

__all__ = [
    "AdditiveRope3d",
    "EvaAttention",
    "SpatialModule",
    "SpatialSequential",
    "SpatiallyAdaptiveConv3d",
    "SpatiallyAdaptiveConvTranspose3d",
    "SwiGLU",
    "apply_rope",
    "reduce_depth_kernel",
    "resample_pos_embed",
    "rope_angles",
]
