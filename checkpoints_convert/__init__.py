"""PyTorch K-SSM v3 checkpoints -> this package's model folders, without importing torch.

torch_zip   reads torch's zip checkpoint format with a restricted unpickler
v3_rules    the v3 state dict's names and shapes, and the config they imply
convert     the conversion itself, behind `kssm convert`
"""
