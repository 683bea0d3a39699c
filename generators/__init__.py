"""Train and sample diffusion models (pixel or latent; optionally differentially private)."""
