"""Reading and writing other model formats (timm, torchvision, Lightning checkpoints...) into our ViT."""
