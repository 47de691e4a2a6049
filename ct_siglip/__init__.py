"""Chest-CT SigLIP: Merlin's I3ResNet image tower + an LLM2Vec text tower, trained with the sigmoid loss.

Model code (towers, loss, data) imports without the trainer; `ct_siglip.trainer` wires them together.
"""

__version__ = "0.1.0"
