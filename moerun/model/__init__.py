"""The MoE model: layers, attention, MoE block, and the decoder that wires them."""
from .attention import AttnMeta
from .transformer import MoEModel

__all__ = ["AttnMeta", "MoEModel"]
