"""ViT backbone, checkpoint interop, DINOv2 trainer, distillation and evaluation. Never imports Prefect."""
