"""The encoders `refgen dit prepare` uses by default (hub ids). Kept apart from prepare.py so the CLI can show
them in --help without importing torch."""

DEFAULT_VAE = "black-forest-labs/FLUX.1-dev"
DEFAULT_T5 = "google/t5-v1_1-xxl"  # 4096-d; google/t5-v1_1-large is the 1024-d option
DEFAULT_DINO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
