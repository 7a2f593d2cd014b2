"""Offline demo: a micro MAE-pretrained ViT (``assets/mae_vit_micro.safetensors``) adapted to
procedural image tasks (``gapt.data.synthetic``) with linear probing and prompt tuning."""
