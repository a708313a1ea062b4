"""Networks (noise-embedded diffusion U-Net, 2.5D U-Net), diffusion process, samplers and
whole-volume denoising. Pure PyTorch/MONAI: no Flower, no file formats."""
