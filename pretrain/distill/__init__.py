"""Distillation of a frozen DINOv2 teacher into smaller ViTs (DINOv2 paper §5), one or several at once."""
